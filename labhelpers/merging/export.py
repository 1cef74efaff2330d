"""Beyond our own merges: peft's merge of LoRA adapters, and the same merge as a mergekit config."""

from __future__ import annotations

from typing import Sequence

from labhelpers.merging.maths import _check_density, _check_weights
from labhelpers.merging.methods import check_merge, get_method

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

    check_merge(method, len(models), base is not None, knobs)
    config = get_method(method).mergekit(models, _check_weights(knobs.get("weights"), len(models)), base, knobs)
    config["dtype"] = dtype
    return yaml.safe_dump(config, sort_keys=False)
