"""Lab 1b's experiments: Lab 1's QLoRA recipe as an Axolotl config, checked by Axolotl's schema and
against the recipe, its label mask against the course's, and the same run trained both ways: loss
curves, pass@1, and Axolotl's merge against peft's."""

from __future__ import annotations

import copy
import gc
import json
import tempfile
from pathlib import Path

import pandas as pd
import torch

from labhelpers import axolotl_cli
from labhelpers.data import tokenize_chats
from labhelpers.models import load_model, local_checkpoint, quantization_config
from labhelpers.peft_methods import peft_config, prepare
from labhelpers.profiles import Profile
from labhelpers.quantization import CheckReport
from labhelpers.tasks import load_split
from labhelpers.training import sft_config, train_sft

COMPARISON_EXAMPLES = 480  # examples each run of this lab trains on, in every profile (never more than max_steps)
TASK = "code"


def comparison_profile(profile: Profile) -> Profile:
    """The profile of this lab's two runs: its recipe, with ``max_steps`` cut to about
    :data:`COMPARISON_EXAMPLES` examples (both runs train twice, on one data set, in a few minutes)."""
    per_step = profile.batch_size * profile.gradient_accumulation_steps
    return profile.with_(max_steps=min(profile.max_steps, max(2, COMPARISON_EXAMPLES // per_step)))


def write_train_split(path: str | Path, task: str = TASK) -> Path:
    """The task's training split as the JSONL file Axolotl reads: one ``{"messages": [...]}`` per line,
    the rows the course's own run trains on, in the same order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in load_split(task, "train"):
            f.write(json.dumps({"messages": row["messages"]}) + "\n")
    return path


def base_model_path(profile: Profile) -> str:
    """A local folder of the profile's base model, for Axolotl's ``base_model``: the shipped model's
    folder, or the hub model's snapshot (downloaded by the course on first use, where a hub is
    reachable: Axolotl and Unsloth themselves run offline), :func:`labhelpers.models.local_checkpoint`."""
    return str(local_checkpoint(profile.base_model))


def recipe_settings(profile: Profile, data_path: str | Path) -> dict:
    """What an Axolotl config of Lab 1's QLoRA recipe must hold, key by key, read off the course's own
    ``BitsAndBytesConfig``, ``LoraConfig`` and ``SFTConfig`` for ``profile`` (so the two runs are one
    recipe): the base model, 4-bit NF4 with double quantization + LoRA, rank, alpha, dropout, targets, steps, learning rate and
    its schedule, batch, accumulation, length, precision, checkpointing, optimizer, seed, and the chat
    data with the loss on the assistant's turns."""
    bnb = quantization_config("nf4", getattr(torch, profile.dtype))
    lora = peft_config("qlora", profile)
    with tempfile.TemporaryDirectory() as out:
        sft = sft_config(profile, "chat", out)
    return {
        "base_model": base_model_path(profile),
        "adapter": "qlora", "load_in_4bit": bnb.load_in_4bit,
        "bnb_config_kwargs": {"bnb_4bit_quant_type": bnb.bnb_4bit_quant_type,
                              "bnb_4bit_use_double_quant": bnb.bnb_4bit_use_double_quant},
        "lora_r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
        "lora_target_modules": set(lora.target_modules),
        "max_steps": sft.max_steps, "learning_rate": sft.learning_rate,
        "lr_scheduler": sft.lr_scheduler_type.value, "warmup_steps": sft.warmup_steps,
        "micro_batch_size": sft.per_device_train_batch_size,
        "gradient_accumulation_steps": sft.gradient_accumulation_steps, "sequence_len": sft.max_length,
        "fp16": sft.fp16, "bf16": sft.bf16, "gradient_checkpointing": sft.activation_checkpointing,
        "optimizer": sft.optim.value, "weight_decay": sft.weight_decay, "seed": sft.seed,
        "datasets.path": str(data_path), "datasets.type": "chat_template", "datasets.field_messages": "messages",
        "datasets.roles_to_train": ["assistant"],
    }


def recipe_config(profile: Profile, data_path: str | Path) -> dict:
    """:func:`recipe_settings` as an Axolotl config (what ``make gpu-smoke`` trains with; the lab's
    exercise writes its own), the chat data rendered with the tokenizer's own template and the loss on
    the assistant's turns and their end-of-turn token."""
    settings = recipe_settings(profile, data_path)
    dataset = {key.split(".", 1)[1]: settings.pop(key) for key in list(settings) if key.startswith("datasets.")}
    dataset.update(ds_type="json", chat_template="tokenizer_default", train_on_eos="turn")
    return {**settings, "lora_target_modules": sorted(settings["lora_target_modules"]), "datasets": [dataset]}


def _setting(cfg: dict, key: str):
    if key.startswith("datasets."):
        datasets = cfg.get("datasets") or [{}]
        return datasets[0].get(key.split(".", 1)[1]) if isinstance(datasets[0], dict) else None
    value = cfg.get(key)
    if key == "lora_target_modules" and value is not None:
        return set(value)
    if key in ("fp16", "bf16", "gradient_checkpointing"):
        return bool(value)  # absent means off, as in Axolotl
    return value


def run_settings(cfg: dict, profile: Profile, out: str | Path) -> dict:
    """``cfg`` with what a run of this lab adds to any config: where it writes (``output_dir``, the
    prepared data), a loss logged every step, no checkpoints, one tokenizing process (the data is
    small), and Axolotl's CUDA-only LoRA kernels off on a CPU (:data:`axolotl_cli.CPU_SETTINGS`)."""
    out = Path(out)
    run = {**copy.deepcopy(cfg), "output_dir": str(out / "adapter"), "dataset_prepared_path": str(out / "prepared"),
           "logging_steps": 1, "save_strategy": "no", "dataset_processes": 1}
    if profile.device == "cpu":
        run.update(axolotl_cli.CPU_SETTINGS)
    return run


def check_axolotl_config(cfg: dict, profile: Profile, data_path: str | Path) -> CheckReport:
    """The graded check of an Axolotl config of the QLoRA recipe: Axolotl's own schema accepts it
    (as ``axolotl train`` would, with this lab's :func:`run_settings`), and every key of
    :func:`recipe_settings` holds the course recipe's value."""
    if not isinstance(cfg, dict):
        return CheckReport(False, 1, [f"expected a dict (the YAML's mapping), got {type(cfg).__name__}"])
    failures = []
    settings = recipe_settings(profile, data_path)
    for key, want in settings.items():
        got = _setting(cfg, key)
        if isinstance(want, dict) and isinstance(got, dict):
            got = {k: got.get(k) for k in want}  # further keys (a compute dtype) are the student's choice
        if got != want:
            failures.append(f"{key}: expected {want!r}, got {got!r}")
    with tempfile.TemporaryDirectory() as out:
        verdict = axolotl_cli.validate([run_settings(cfg, profile, out)])[0]
    failures += [f"Axolotl's schema: {e}" for e in verdict.errors]
    return CheckReport(not failures, len(settings) + 1, failures)


def broken_configs(cfg: dict) -> dict[str, dict]:
    """Three mistakes Axolotl's schema catches before any model loads, each made on a copy of ``cfg``:
    QLoRA without the 4-bit base, a dataset type Axolotl retired, and DeepSpeed with FSDP at once."""
    dataset = dict(cfg["datasets"][0])
    return {
        "qlora without load_in_4bit": {**cfg, "load_in_4bit": False},
        "retired dataset type sharegpt": {**cfg, "datasets": [{**dataset, "type": "sharegpt"}]},
        "deepspeed and fsdp together": {**cfg, "deepspeed": "deepspeed_configs/zero2.json", "fsdp": ["full_shard"]},
    }


def schema_errors(cfg: dict, profile: Profile) -> pd.DataFrame:
    """Axolotl's verdict on ``cfg`` and on each of :func:`broken_configs`: one row per config, with
    whether it is valid and Axolotl's first error message."""
    configs = {"your config": cfg, **broken_configs(cfg)}
    with tempfile.TemporaryDirectory() as out:
        verdicts = axolotl_cli.validate([run_settings(c, profile, out) for c in configs.values()])
    return pd.DataFrame([{"config": name, "valid": v.valid, "axolotl says": v.errors[0] if v.errors else ""}
                         for name, v in zip(configs, verdicts)])


def mask_agreement(prepared, tokenizer, task: str = TASK) -> dict:
    """Axolotl's tokenized rows (``axolotl preprocess``) against the course's assistant-only mask
    (:func:`labhelpers.data.tokenize_chats`) of the same conversations: ``rows`` (Axolotl's),
    ``same_tokens`` (rows whose token ids the course's tokenization also gives), ``same_labels``
    (of those, rows whose trained positions and labels match too) and ``first_difference``, a row where
    the labels differ (None when every row agrees)."""
    course = tokenize_chats([r["messages"] for r in load_split(task, "train")], tokenizer, None)
    labels_of = {tuple(c["input_ids"]): c["labels"] for c in course}
    same_tokens = same_labels = 0
    first = None
    for row in prepared:
        ids = tuple(row["input_ids"])
        if ids not in labels_of:
            continue
        same_tokens += 1
        if list(row["labels"]) == list(labels_of[ids]):
            same_labels += 1
        elif first is None:
            first = {"tokens": tokenizer.convert_ids_to_tokens(list(ids)), "axolotl": list(row["labels"]),
                     "course": labels_of[ids]}
    return {"rows": len(prepared), "same_tokens": same_tokens, "same_labels": same_labels, "first_difference": first}


def course_run(profile: Profile, dataset=None):
    """Lab 1's QLoRA run (the course's transformers + peft + TRL code) on ``dataset`` (default: the
    task's training split): the :class:`~labhelpers.training.TrainResult`, with the trained model and
    its tokenizer."""
    setup = prepare("qlora", profile)
    rows = load_split(TASK, "train") if dataset is None else dataset
    return train_sft(dataset=rows, profile=profile, **setup), setup["tokenizer"]


def nf4_adapter_model(profile: Profile, adapter_dir: str | Path):
    """An adapter trained on the 4-bit base (by Axolotl, Unsloth or the course), on that base, loaded with
    the course's peft."""
    from peft import PeftModel

    base, tokenizer = load_model(profile, quantization="nf4")
    return PeftModel.from_pretrained(base, str(adapter_dir)), tokenizer


def nf4_roundtrip(weight: torch.Tensor, double_quant: bool = True) -> torch.Tensor:
    """``weight`` quantized to NF4 (blocks of 64; with ``double_quant`` the blocks' scales quantized
    again, as QLoRA stores the base) and back, by bitsandbytes: the weights a 4-bit layer computes with."""
    import bitsandbytes.functional as bnb_f

    flat = weight.detach().reshape(-1).to(torch.float32).contiguous()
    packed, state = bnb_f.quantize_4bit(flat, quant_type="nf4", compress_statistics=double_quant)
    return bnb_f.dequantize_4bit(packed, state, quant_type="nf4").reshape(weight.shape).to(weight.dtype)


# peft merges into: {label: (every matrix through NF4 first?, with double quantization?)}
PEFT_BASES = {"every matrix NF4, double quant": (True, True), "every matrix NF4, single quant": (True, False),
              "original base": (False, False)}


def peft_merge(profile: Profile, adapter_dir: str | Path, nf4: bool, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """peft's ``merge_and_unload`` of the adapter into the full-precision base, with ``nf4`` after every
    matrix of the base went through :func:`nf4_roundtrip`: the merged weights by name."""
    from peft import PeftModel

    base, _ = load_model(profile)
    if nf4:
        with torch.no_grad():
            for param in base.parameters():
                if param.ndim >= 2:
                    param.copy_(nf4_roundtrip(param, double_quant))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().float().cpu() for k, v in merged.state_dict().items()}


def merge_table(profile: Profile, adapter_dir: str | Path, merged: dict[str, str | Path]) -> pd.DataFrame:
    """Each ``axolotl merge-lora`` output in ``merged`` (``{label: folder}``) against peft's merge of the
    same adapter into each base of :data:`PEFT_BASES`: the largest absolute difference over every
    tensor both hold (rows: Axolotl's merges, columns: peft's)."""
    from safetensors.torch import load_file

    axolotl = {}
    for label, folder in merged.items():
        axolotl[label] = {}
        for shard in sorted(Path(folder).glob("*.safetensors")):
            axolotl[label].update({k: v.float() for k, v in load_file(str(shard)).items()})
    table = pd.DataFrame(index=list(merged), columns=list(PEFT_BASES), dtype=float)
    for column, (nf4, double_quant) in PEFT_BASES.items():
        peft = peft_merge(profile, adapter_dir, nf4, double_quant)
        for label, weights in axolotl.items():
            common = set(weights) & set(peft)
            if not common:
                raise ValueError(f"{merged[label]} holds no tensor of the base model; is it a merged model folder?")
            table.loc[label, column] = max(float((weights[k] - peft[k]).abs().max()) for k in common)
        del peft
        gc.collect()
    return table
