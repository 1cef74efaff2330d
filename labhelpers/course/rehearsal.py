"""Hub-shaped rehearsal models: the GPU profiles' code path, offline, on a CPU.

The ``t4`` and ``gpu-24gb`` profiles name hub models (Qwen2.5-Coder instruct, CodeLlama instruct).
No hub can be reached in CI, so this module builds a tiny random-weight stand-in for each, with what
the course's code depends on: the architecture class and its shape quirks, at hidden size 16 to 24 (Qwen2's tied embeddings and
q/k/v biases, grouped-query attention, the vocabulary size in the config: 151,936 for Qwen2, 32,016
for CodeLlama, 128,256 for Llama 3), the special tokens (no BOS in Qwen, ``<s>``/``</s>`` in
CodeLlama, ``<|eot_id|>`` ending Llama 3 turns) and the family's chat template, without
``{% generation %}`` markers, as the hub's are (:data:`labhelpers.chat.TEMPLATE_FAMILIES`).

Each is written into a Hugging Face hub cache (``build/rehearsal-hub``, the ``models--org--name``
layout) under its hub id, so the unchanged ``load_model(profile)`` resolves it with
``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing there (:func:`environment`). Build them with
``python -m labhelpers.course.rehearsal`` (``make rehearsal-models``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from labhelpers.chat import TEMPLATE_FAMILIES
from labhelpers.memory.architectures import architectures_dir
from labhelpers.paths import REPO_ROOT, base_model_dir

REVISION = "0" * 40  # the snapshot folder name (a hub commit hash in a real cache)
BUILDER_VERSION = 3  # bump to rebuild existing caches when the specs change


@dataclass(frozen=True)
class RehearsalModel:
    """What a hub model looks like to the course's code, at a tiny size."""

    hub_id: str
    model_type: str  # transformers' config type: qwen2, llama
    template: str  # a key of labhelpers.chat.TEMPLATE_FAMILIES
    vocab_size: int  # the hub config's (embedding rows); the tokenizer itself is small
    bos: str | None
    eos: str
    pad: str | None
    specials: tuple[str, ...]  # every special token the template uses
    tie_word_embeddings: bool
    shape: dict = field(default_factory=dict)  # hidden size, layers, heads: tiny
    config_extra: dict = field(default_factory=dict)
    architecture: str = ""  # the shipped config (data/architectures) with the hub model's real shape


FULL_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim")


def full_shape(spec: RehearsalModel) -> dict:
    """The hub model's real shape (hidden size, layers, heads), from its shipped config."""
    config = json.loads((architectures_dir() / f"{spec.architecture}.json").read_text())
    return {key: config[key] for key in FULL_SHAPE_KEYS if key in config}


_QWEN = dict(model_type="qwen2", template="chatml", vocab_size=151936, bos=None, eos="<|im_end|>",
             pad="<|endoftext|>", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), tie_word_embeddings=True,
             config_extra=dict(rope_theta=1000000.0, max_position_embeddings=32768, use_sliding_window=False))
MODELS = {m.hub_id: m for m in (
    RehearsalModel("Qwen/Qwen2.5-Coder-0.5B-Instruct", **_QWEN, architecture="qwen2.5-coder-0.5b",
                   shape=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              intermediate_size=48)),
    RehearsalModel("Qwen/Qwen2.5-Coder-1.5B-Instruct", **_QWEN, architecture="qwen2.5-coder-1.5b",
                   shape=dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
                              intermediate_size=64)),
    RehearsalModel("codellama/CodeLlama-7b-Instruct-hf", model_type="llama", template="inst", vocab_size=32016,
                   bos="<s>", eos="</s>", pad=None, specials=("<unk>", "<s>", "</s>"), tie_word_embeddings=False,
                   architecture="codellama-7b",
                   shape=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                              intermediate_size=48),
                   config_extra=dict(rope_theta=1000000.0, max_position_embeddings=16384)),
    RehearsalModel("meta-llama/Llama-3.2-1B-Instruct", model_type="llama", template="llama3", vocab_size=128256,
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                   specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"), tie_word_embeddings=True, architecture="llama-3.2-1b",
                   shape=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              intermediate_size=48),
                   config_extra=dict(rope_theta=500000.0, max_position_embeddings=131072)),
)}


def cache_dir(full_size: bool = False) -> Path:
    """The hub cache the rehearsal models live in (``SFTLABS_REHEARSAL_HUB`` overrides it); the
    full-size stand-ins (:func:`build` with ``full_size``) live in a cache of their own."""
    if full_size:
        return REPO_ROOT / "build" / "rehearsal-hub-full"
    return Path(os.environ.get("SFTLABS_REHEARSAL_HUB", REPO_ROOT / "build" / "rehearsal-hub"))


def environment(cache: Path | None = None) -> dict[str, str]:
    """Environment variables under which ``from_pretrained(hub_id)`` finds the rehearsal models and
    nothing is fetched. Set them before ``huggingface_hub`` is imported (a notebook kernel's environment)."""
    return {"HF_HUB_CACHE": str(cache or cache_dir()), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def snapshot_dir(hub_id: str, cache: Path | None = None) -> Path:
    """Where ``hub_id``'s files sit in the cache (``models--org--name/snapshots/<revision>``)."""
    return (cache or cache_dir()) / f"models--{hub_id.replace('/', '--')}" / "snapshots" / REVISION


def build_tokenizer(spec: RehearsalModel) -> PreTrainedTokenizerFast:
    """The shipped byte-level BPE with this family's special tokens, roles and chat template."""
    data = json.loads((base_model_dir("tiny") / "tokenizer.json").read_text())
    data["added_tokens"] = []  # the course's own specials are not this family's
    data["post_processor"] = None
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(list(spec.specials))
    if spec.bos:  # Llama tokenizers prepend BOS to plain text; Qwen's add nothing
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, tok.token_to_id(spec.bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad,
                                   unk_token="<unk>" if "<unk>" in spec.specials else None)
    fast.chat_template = TEMPLATE_FAMILIES[spec.template]
    fast.model_max_length = spec.config_extra.get("max_position_embeddings", 32768)
    return fast


def stand_in_config(spec: RehearsalModel, full_size: bool = False, **token_ids):
    """The stand-in's ``transformers`` config: the family's, tiny or at the hub model's real shape."""
    shape = full_shape(spec) if full_size else spec.shape
    return AutoConfig.for_model(spec.model_type, vocab_size=spec.vocab_size, tie_word_embeddings=spec.tie_word_embeddings,
                                **shape, **spec.config_extra, **token_ids)


def build_model(spec: RehearsalModel, tokenizer, seed: int = 0, full_size: bool = False):
    """A random-weight model of the family's architecture with the hub config's vocabulary size: tiny,
    or with ``full_size`` at the hub model's real shape (for a GPU: its memory and speed are the real
    model's, its answers are noise). Full-size weights are drawn on the GPU when there is one."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) if token else None
           for name, token in (("bos_token_id", spec.bos), ("eos_token_id", spec.eos), ("pad_token_id", spec.pad))}
    config = stand_in_config(spec, full_size, **ids)
    torch.manual_seed(seed)
    with torch.device("cuda" if full_size and torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # hub checkpoints ship in bf16
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    return model


def build(cache: Path | None = None, force: bool = False, full_size: tuple[str, ...] = ()) -> Path:
    """Write every rehearsal model into the hub cache (skipped when already built by this version):
    tiny, except the hub ids in ``full_size``, built at their real shape (a GPU smoke run's base
    model; a 0.5B model is about 1 GB on disk). With ``full_size`` the default cache is
    ``build/rehearsal-hub-full``."""
    unknown = sorted(set(full_size) - set(MODELS))
    if unknown:
        raise ValueError(f"no rehearsal model for {unknown}; known hub ids: {', '.join(MODELS)}")
    cache = cache or cache_dir(full_size=bool(full_size))
    stamp = cache / "rehearsal.json"
    wanted = {"version": BUILDER_VERSION, "models": sorted(MODELS), "full_size": sorted(full_size)}
    if not force and stamp.exists() and {"full_size": [], **json.loads(stamp.read_text())} == wanted:
        return cache
    for spec in MODELS.values():
        folder = snapshot_dir(spec.hub_id, cache)
        shutil.rmtree(folder.parent.parent, ignore_errors=True)
        folder.mkdir(parents=True)
        tokenizer = build_tokenizer(spec)
        tokenizer.save_pretrained(folder)
        build_model(spec, tokenizer, full_size=spec.hub_id in full_size).save_pretrained(folder, safe_serialization=True)
        refs = folder.parent.parent / "refs"
        refs.mkdir()
        (refs / "main").write_text(REVISION)
    stamp.write_text(json.dumps(wanted, indent=1) + "\n")
    return cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the hub-shaped rehearsal models (offline)")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--full-size", nargs="*", default=(), metavar="HUB_ID",
                        help="build these hub ids at their real shape (random weights)")
    args = parser.parse_args(argv)
    print(build(args.cache, args.force, tuple(args.full_size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
