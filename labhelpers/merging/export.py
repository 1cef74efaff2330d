"""Beyond our own merges: peft's merge of LoRA adapters, and the same merge as a mergekit config."""

from __future__ import annotations

from typing import Sequence

from labhelpers.merging.methods import _check_density, _check_knobs, _check_weights

PEFT_COMBINATIONS = ("linear", "ties", "dare_ties")


def merge_lora_adapters(peft_model, adapters: Sequence[str], weights: Sequence[float], combination_type: str,
                        name: str, density: float | None = None):
    """``peft``'s ``add_weighted_adapter`` on loaded LoRA adapters, then activate the result.

    ``linear`` needs adapters of one rank and mixes the factors; ``ties`` and ``dare_ties`` work on the
    full update :math:`BA` of each adapter (via SVD back to low rank), with ``density`` as in TIES/DARE.
    """
    if combination_type not in PEFT_COMBINATIONS:
        raise ValueError(f"unknown combination {combination_type!r}; valid: {', '.join(PEFT_COMBINATIONS)}")
    _check_weights(weights, len(adapters))
    kwargs = {}
    if combination_type != "linear":
        if density is None:
            raise ValueError(f"{combination_type} needs density= in (0, 1]")
        _check_density(density)
        kwargs["density"] = density
    peft_model.add_weighted_adapter(list(adapters), list(weights), name, combination_type=combination_type, **kwargs)
    peft_model.set_adapter(name)
    return peft_model


def mergekit_config(method: str, models: Sequence[str], base: str | None = None, dtype: str = "bfloat16",
                    **knobs) -> str:
    """The same merge as a mergekit YAML config (run ``mergekit-yaml config.yml ./out`` on any machine).

    Maps our names to mergekit's: ``dare`` -> ``dare_linear`` (``dare_ties`` with ``sign_election``),
    ``lam`` -> ``lambda``; ``slerp`` uses the first model as mergekit's ``base_model`` (t = 0).
    """
    import yaml

    _check_knobs(method, len(models), base is not None, knobs)
    weights = _check_weights(knobs.get("weights"), len(models))
    config: dict = {}
    if method == "slerp":
        config = {"merge_method": "slerp", "base_model": str(models[0]),
                  "models": [{"model": str(m)} for m in models], "parameters": {"t": float(knobs["t"])}}
    else:
        name = {"dare": "dare_ties" if knobs.get("sign_election") else "dare_linear"}.get(method, method)
        entries = []
        for model, weight in zip(models, weights):
            params = {"weight": weight}
            if method in ("ties", "dare"):
                params["density"] = float(knobs["density"])
            entries.append({"model": str(model), "parameters": params})
        config = {"merge_method": name, "models": entries}
        if base is not None:
            config["base_model"] = str(base)
        global_params = {}
        if method == "linear":
            global_params["normalize"] = True
        if method in ("task_arithmetic", "ties", "dare"):
            global_params["lambda"] = float(knobs.get("lam", 1.0))
        if method == "ties":
            global_params["normalize"] = True
        if global_params:
            config["parameters"] = global_params
    config["dtype"] = dtype
    return yaml.safe_dump(config, sort_keys=False)
