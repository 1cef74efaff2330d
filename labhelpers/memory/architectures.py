"""Architectures read from ``config.json`` files (the shipped ones need no weights): exact parameter
counts and the shapes the estimator needs."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from labhelpers.models import model_source
from labhelpers.paths import data_dir

SIZE_LABELS = {"1B": "llama-3.2-1b", "3B": "llama-3.2-3b", "7B": "llama-2-7b", "13B": "llama-2-13b",
               "70B": "llama-3.1-70b"}


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer (Llama, Mistral, Qwen2 families), from its config.

    Parameter counts are exact: the model is built on the ``meta`` device (no memory) and counted.
    """

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int
    linear_params: int  # inside decoder layers (what LoRA targets and NF4 quantizes)
    linear_shapes: tuple[tuple[str, int, int, int], ...]  # (kind, in, out, count)

    @property
    def billions(self) -> float:
        return self.params / 1e9


def architecture(source) -> Architecture:
    """See :func:`_architecture`; shipped names, labels and paths are cached."""
    if isinstance(source, Architecture):
        return source
    if isinstance(source, (str, Path)):
        return _cached_architecture(str(source))
    return _architecture(source)


@functools.lru_cache(maxsize=64)
def _cached_architecture(source: str) -> Architecture:
    return _architecture(source)


def _architecture(source) -> Architecture:
    """An :class:`Architecture` from a shipped name (``list_architectures()``), a size label
    (``"7B"``), a path to a ``config.json`` (or its folder), a ``transformers`` config, or a model."""
    if hasattr(source, "config") and hasattr(source, "parameters"):
        source = source.config
    if isinstance(source, PretrainedConfig):
        return _config_architecture(source.to_json_string(use_diff=False),
                                    getattr(source, "_name_or_path", "") or source.model_type)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"architecture: expected a name, size label, config path or config, got {type(source).__name__}")
    key = str(source)
    name = SIZE_LABELS.get(key.upper(), key)
    shipped = architectures_dir() / f"{name}.json"
    path = shipped if shipped.exists() else Path(key)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"unknown model {source!r}: use a size label ({', '.join(SIZE_LABELS)}), a shipped "
                         f"architecture ({', '.join(list_architectures())}) or a path to a config.json")
    config = AutoConfig.for_model(**json.loads(path.read_text()))
    return _from_config(config, path.stem if path.name != "config.json" else path.parent.name)


def architectures_dir() -> Path:
    """Shipped ``config.json`` files of real models (no weights): ``data/architectures/<name>.json``."""
    return data_dir() / "architectures"


@functools.lru_cache(maxsize=16)
def _config_architecture(config_json: str, name: str) -> Architecture:
    fields = json.loads(config_json)
    fields.pop("quantization_config", None)  # the shape is what matters, not how it is stored
    return _from_config(AutoConfig.for_model(**fields), Path(name).name or name)


def list_architectures() -> list[str]:
    """Names of the shipped architecture configs (``data/architectures/*.json``)."""
    return sorted(p.stem for p in architectures_dir().glob("*.json"))


def _from_config(config, name: str) -> Architecture:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    shapes: dict[tuple[str, int, int], int] = {}
    layers = getattr(model, "model", model).layers
    for module_name, module in layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = (module_name.split(".")[-1], module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    linear = sum(i * o * n for (_, i, o), n in shapes.items())
    heads = config.num_attention_heads
    return Architecture(
        name=name, hidden=config.hidden_size, intermediate=config.intermediate_size,
        layers=config.num_hidden_layers, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)), params=params, linear_params=linear,
        linear_shapes=tuple((k, i, o, n) for (k, i, o), n in sorted(shapes.items())))


def profile_architecture(profile) -> Architecture:
    """The :class:`Architecture` of the profile's base model: a shipped size's folder, or a hub id's
    config as ``transformers`` resolves it (the hub cache; offline, the rehearsal stand-in's)."""
    source = model_source(profile.base_model)
    if Path(source).exists():
        return architecture(source)
    return architecture(AutoConfig.from_pretrained(source))


def hub_architecture(hub_id: str) -> Architecture:
    """The real architecture behind a hub id, from the shipped configs (``Qwen/Qwen2.5-Coder-0.5B-Instruct``
    -> ``qwen2.5-coder-0.5b``), so a GPU profile is planned without its weights, or the rehearsal
    stand-in in the hub cache being taken for it. A shipped size is its local folder."""
    if Path(model_source(hub_id)).exists():
        return architecture(model_source(hub_id))
    name = hub_id.rsplit("/", 1)[-1].lower().removesuffix("-hf").removesuffix("-instruct")
    if name not in list_architectures():
        raise ValueError(f"no shipped architecture for {hub_id!r} (looked for {name!r}); add its config.json as "
                         f"data/architectures/{name}.json")
    return architecture(name)
