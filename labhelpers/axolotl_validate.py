"""Validate Axolotl configs with Axolotl's own schema. Run by the Python of Axolotl's environment
(labhelpers.axolotl_cli.validate), never imported by the course: it imports axolotl, not labhelpers.

Reads a JSON list of configs on stdin; writes a JSON list of {"valid": bool, "errors": [str]}."""
import json
import logging
import sys


def errors_of(exc: Exception) -> list[str]:
    if hasattr(exc, "errors"):  # pydantic's ValidationError: one line per failed check
        return [(".".join(str(p) for p in e.get("loc", ())) + ": " if e.get("loc") else "") + e["msg"]
                for e in exc.errors()]
    return [f"{type(exc).__name__}: {exc}"]


def main() -> None:
    logging.disable(logging.WARNING)
    from axolotl.cli.config import gpu_capabilities
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    capabilities, env_capabilities = gpu_capabilities()
    results = []
    for cfg in json.load(sys.stdin):
        try:
            validate_config(DictDefault(cfg), capabilities=capabilities, env_capabilities=env_capabilities)
            results.append({"valid": True, "errors": []})
        except Exception as exc:  # noqa: BLE001 - every rejection is reported, whatever its type
            results.append({"valid": False, "errors": errors_of(exc)})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
