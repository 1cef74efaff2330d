"""Lab 1b's backend comparison: Lab 1's QLoRA run through the course's transformers + peft + TRL code
and through Unsloth's ``FastLanguageModel``, each in its own process, on the same tokenized rows, seed,
sequence length, batch and steps: tokens per second, peak CUDA memory, and both loss curves.

Both processes start clean: Unsloth must be imported before transformers, and each run's
``max_memory_allocated`` / ``max_memory_reserved`` (reset when the process starts) are its own. The
course's run is ``python -m labhelpers.labs.backend_comparison SPEC RESULT``; it writes the same
result file as :mod:`labhelpers.unsloth_train`, read back as :class:`~labhelpers.unsloth_cli.BackendRun`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import torch

from labhelpers import unsloth_cli
from labhelpers.data import sft_dataset
from labhelpers.labs import lab1b
from labhelpers.models import load_tokenizer
from labhelpers.memory.measure import reset_cuda_peak
from labhelpers.peft_methods import get_method, peft_config
from labhelpers.profiles import Profile, from_json
from labhelpers.tasks import load_split
from labhelpers.tool_env import run_logged
from labhelpers.training import final_loss, sft_config_fields
from labhelpers.unsloth_cli import BackendRun

CPU_LABEL = "no kernels, no speed claim"  # what a CPU run of Unsloth is: its CPU fallback is stock transformers + peft + TRL


def backend_profile(profile: Profile) -> Profile:
    """The profile of both runs: Lab 1b's (:func:`~labhelpers.labs.lab1b.comparison_profile`), with
    batches drawn as stock TRL draws them (random, seeded; no length grouping), so that step ``k`` of
    either run trains on the same rows."""
    return lab1b.comparison_profile(profile).with_(length_group=0)


def qlora_spec(profile: Profile, workdir: str | Path) -> dict:
    """Lab 1's QLoRA recipe for ``profile`` (:func:`backend_profile`) as the spec both processes train
    from: the base model's folder, the training split tokenized once by the course (JSONL of
    ``input_ids`` + assistant-only ``labels``), the course's ``LoraConfig`` and ``SFTConfig`` fields and
    its learning rate for QLoRA. Activation checkpointing is its own entry: Unsloth switches on its own
    (``use_gradient_checkpointing="unsloth"``) where the course's ``SFTConfig`` has the flag."""
    run_profile = backend_profile(profile)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows, fmt = sft_dataset(load_split(lab1b.TASK, "train"), load_tokenizer(run_profile))
    data = workdir / "train-tokenized.jsonl"
    with data.open("w") as f:
        for row in rows:
            f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
    sft = sft_config_fields(run_profile, fmt, str(workdir / "trainer"), learning_rate=get_method("qlora").lr(run_profile))
    lora = peft_config("qlora", run_profile)
    return {"profile": run_profile.to_json(), "model": lab1b.base_model_path(run_profile), "dtype": run_profile.dtype,
            "max_seq_length": run_profile.max_seq_length, "seed": run_profile.seed, "data": str(data),
            "lora": {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
                     "target_modules": sorted(lora.target_modules)},
            "gradient_checkpointing": sft.pop("activation_checkpointing"), "sft": sft}


def run_course(spec: dict, workdir: str | Path, timeout_s: float = 1800) -> BackendRun:
    """The spec's run through the course's own code (:func:`lab1b.course_run`), in a new
    process of this Python; its log is ``<workdir>/course.log``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "adapter_dir": str(workdir / "adapter")}
    spec_path, result_path = workdir / "course-spec.json", workdir / "course-result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    run_logged([sys.executable, "-m", "labhelpers.labs.backend_comparison", spec_path, result_path],
               workdir / "course.log", timeout_s=timeout_s)
    return BackendRun.read(result_path, spec["adapter_dir"])


def run_unsloth(spec: dict, workdir: str | Path, timeout_s: float = 1800) -> BackendRun:
    """The spec's run through Unsloth, in a process of Unsloth's environment (:func:`unsloth_cli.train`)."""
    return unsloth_cli.train({**spec, "adapter_dir": str(Path(workdir) / "adapter")}, workdir, timeout_s)


def _train_course(spec: dict) -> dict:
    """What the course's process measures (the fields of :class:`BackendRun`)."""
    import datasets
    import peft
    import transformers
    import trl

    cuda = torch.cuda.is_available()
    if cuda:  # the peaks cover the whole run: loading the base, the adapter and training
        reset_cuda_peak()
    with open(spec["data"]) as f:
        rows = datasets.Dataset.from_list([json.loads(line) for line in f])
    run, _ = lab1b.course_run(from_json(spec["profile"]), rows)
    run.model.save_pretrained(spec["adapter_dir"])
    quant = run.model.config.quantization_config.to_dict()
    mib = 2 ** 20
    return {"backend": "course", "device": "cuda" if cuda else "cpu",
            "losses": run.loss_curve[["step", "loss"]].values.tolist(), "train_seconds": run.train_seconds,
            "steps": run.steps, "train_tokens": run.train_tokens,
            "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / mib if cuda else None,
            "max_memory_reserved_mib": torch.cuda.max_memory_reserved() / mib if cuda else None,
            "trainable_params": run.trainable_params, "quantization": {k: str(v) for k, v in quant.items()},
            "versions": {m.__name__: m.__version__ for m in (torch, transformers, trl, peft, datasets)}}


def comparison(runs: dict[str, BackendRun]) -> pd.DataFrame:
    """One row per run: device, steps, tokens, training seconds, tokens/s, peak CUDA memory (allocated
    and reserved; None on a CPU), final loss, and what a speed difference means there."""
    rows = []
    for name, run in runs.items():
        rows.append({"run": name, "device": run.device, "steps": run.steps, "tokens": run.train_tokens,
                     "train_s": run.train_seconds, "tokens_per_s": run.tokens_per_second,
                     "max_allocated_mib": run.max_memory_allocated_mib, "max_reserved_mib": run.max_memory_reserved_mib,
                     "final_loss": final_loss(run.loss_curve),
                     "speed": CPU_LABEL if run.device == "cpu" else "measured"})
    return pd.DataFrame(rows).set_index("run")


def loss_parity(a: BackendRun, b: BackendRun) -> dict:
    """How far two runs' loss curves are apart, step by step: the steps both logged, the difference
    at the first step (the same batch through the same base: it checks the data, the mask and the
    4-bit base before any update) and the largest over all steps."""
    both = a.loss_curve.merge(b.loss_curve, on="step", suffixes=("_a", "_b"))
    gap = (both["loss_a"] - both["loss_b"]).abs()
    return {"steps": len(both), "same_steps": len(both) == a.steps == b.steps,
            "first_step_difference": float(gap.iloc[0]), "max_difference": float(gap.max()),
            "mean_difference": float(gap.mean())}


def main(argv: list[str] | None = None) -> int:
    """The course's process: ``python -m labhelpers.labs.backend_comparison SPEC RESULT``."""
    spec_path, result_path = argv if argv is not None else sys.argv[1:3]
    spec = json.loads(Path(spec_path).read_text())
    Path(result_path).write_text(json.dumps(_train_course(spec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
