"""Supervised fine-tuning on top of TRL's ``SFTTrainer``, with the measurements every lab reports.

:func:`train_sft` trains a model (optionally wrapped by a ``peft`` config) on a task dataset and
returns a :class:`TrainResult`: the loss curve, seconds per step, peak memory, parameter counts.
Conversational rows train on assistant tokens only (tokenized here with their assistant-only labels,
:func:`labhelpers.data.sft_dataset`), prompt/completion rows on the completion only
(``completion_only_loss``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from labhelpers import profiles, tracking
from labhelpers.data import sft_dataset, training_dataset
from labhelpers.memory import check_fits, measure_peak_memory
from labhelpers.models import count_parameters, load_model, unwrap_peft
from labhelpers.peft_methods import TrainingMethod, callbacks_for, default_learning_rate
from labhelpers.peft_methods import peft_config as make_peft_config
from labhelpers.profiles import Profile
from labhelpers.trainer_speedups import LengthGroupedBatches, supports_trained_positions_loss, trained_positions_loss
from labhelpers.tasks import task_rows


@dataclass
class TrainResult:
    """What a training run measured. ``model`` is the trained model (a ``PeftModel`` under PEFT)."""

    model: object
    loss_curve: pd.DataFrame
    sec_per_step: float
    peak_mib: float
    train_seconds: float
    steps: int
    trainable_params: int
    total_params: int
    extra: dict = field(default_factory=dict)
    train_tokens: int = 0  # input tokens the steps processed (padding excluded)

    @property
    def tokens_per_second(self) -> float:
        """Training throughput: :attr:`train_tokens` over the whole run's wall time (first step included)."""
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10% of logged steps (:func:`final_loss`)."""
        return final_loss(self.loss_curve)

    def summary(self) -> dict:
        return {"trainable_params": self.trainable_params, "total_params": self.total_params,
                "trainable_pct": 100 * self.trainable_params / self.total_params,
                "sec_per_step": self.sec_per_step, "peak_mib": self.peak_mib,
                "final_train_loss": self.final_loss, "train_seconds": self.train_seconds,
                "tokens_per_sec": self.tokens_per_second}


def final_loss(loss_curve: pd.DataFrame) -> float:
    """Mean of a loss curve's ``loss`` over its last 10% of logged steps (at least one)."""
    tail = max(1, len(loss_curve) // 10)
    return float(loss_curve["loss"].iloc[-tail:].mean())


class _Recorder(TrainerCallback):
    """Records the logged loss of every step and the wall time of each optimizer step, and shows one
    progress bar with the current loss (instead of the Trainer's per-step log lines)."""

    def __init__(self, desc: str) -> None:
        self.losses: list[tuple[int, float]] = []
        self.step_seconds: list[float] = []
        self._t0 = 0.0
        self._desc = desc
        self._bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._bar = tqdm(total=state.max_steps, desc=self._desc, unit="step")

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._t0)
        self._bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))
            self._bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        self._bar.close()


def sft_config(profile: Profile, dataset_format: str, output_dir: str, **overrides):
    """The ``SFTConfig`` a profile implies; ``overrides`` replace any field (e.g. ``max_steps``)."""
    from trl import SFTConfig

    return SFTConfig(**sft_config_fields(profile, dataset_format, output_dir, **overrides))


def sft_config_fields(profile: Profile, dataset_format: str, output_dir: str, **overrides) -> dict:
    """The fields :func:`sft_config` sets, as plain values: what another process's ``SFTConfig`` is
    built from (:mod:`labhelpers.labs.backend_comparison`)."""
    fields = dict(
        output_dir=output_dir, max_steps=profile.max_steps, per_device_train_batch_size=profile.batch_size,
        gradient_accumulation_steps=profile.gradient_accumulation_steps, learning_rate=profile.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, profile.max_steps // 20), weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to="none", seed=profile.seed, data_seed=profile.seed,
        max_length=profile.max_seq_length, activation_checkpointing=profile.gradient_checkpointing,
        use_cpu=profile.device == "cpu", bf16=profile.dtype == "bfloat16", fp16=profile.dtype == "float16",
        assistant_only_loss=dataset_format == "chat", completion_only_loss=dataset_format == "completion",
        dataset_text_field="text",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    fields.update(overrides)
    return fields


def trainer_class(loss_penalty: Callable[[torch.nn.Module], torch.Tensor] | None = None, fused_lm_head: bool = True,
                  length_group: int = 0):
    """The ``SFTTrainer`` subclass every run uses.

    * ``length_group=k > 0`` draws training batches with ``LengthGroupedBatches(group=k)`` (less padding,
      same rows per epoch; ``make bench`` measures what it buys); 0 draws random batches.

    * ``fused_lm_head=False`` drops TRL's chunked log-probability head and trains on the model's own
      cross-entropy over the collator's labels (the same loss: -100 outside the trained tokens, summed
      and divided by the batch's trained tokens), computed by :func:`trained_positions_loss` (the head
      only at trained positions) where the model allows it. The fused head saves memory on large
      vocabularies (a GPU profile keeps it) but costs time on small ones: it also computes entropy and
      token accuracy every step (see ``make bench``).

    * Checkpoints are written atomically: into ``<output_dir>/.staging/checkpoint-N``, then renamed to
      ``<output_dir>/checkpoint-N``. A run killed while saving leaves no half-written checkpoint for
      ``resume`` to trip on (``transformers`` itself writes in place).
    * With ``loss_penalty``, the training loss is the task loss plus ``loss_penalty(model)``.
    """
    from trl import SFTTrainer

    class SFTLabsTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not fused_lm_head:
                _drop_fused_head(self.model)

        def _trained_positions_only(self, model, inputs, return_outputs) -> bool:
            """A training step of one process, on labels the model would shift itself, of a model
            :func:`trained_positions_loss` supports (the Trainer's loss scaling is then the identity)."""
            return (not return_outputs and model.training and self.accelerator.num_processes == 1
                    and "labels" in inputs and "shift_labels" not in inputs and self.label_smoother is None
                    and self.compute_loss_func is None
                    and supports_trained_positions_loss(self.accelerator.unwrap_model(model)))

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if length_group < 1 or "input_ids" not in getattr(dataset, "column_names", ()):
                return super()._get_train_sampler(train_dataset)
            return LengthGroupedBatches([len(ids) for ids in dataset["input_ids"]], self.args.train_batch_size,
                                        self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                                        group=length_group)

        def _save_checkpoint(self, model, trial):
            final = Path(self.args.output_dir)
            staging = final / ".staging"
            shutil.rmtree(staging, ignore_errors=True)
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(final)
            for folder in staging.glob("checkpoint-*"):  # (a model card beside them is dropped)
                target = final / folder.name
                if target.exists():
                    shutil.rmtree(target)
                os.replace(folder, target)
            shutil.rmtree(staging, ignore_errors=True)
            if self.args.should_save:
                rotate_checkpoints(output_dir=str(final), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

        train_tokens = 0  # summed per micro-batch in compute_loss (padding excluded); a tensor on the
        # device once a mask is added, read once after training (no host sync per step)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                mask = inputs.get("attention_mask")
                self.train_tokens = self.train_tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel())
            if fused_lm_head:
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
            elif self._trained_positions_only(model, inputs, return_outputs):
                out = trained_positions_loss(self.accelerator.unwrap_model(model), inputs,
                                             num_items_in_batch if self.model_accepts_loss_kwargs else None)
            else:  # transformers' Trainer: the model's loss on the masked labels
                inputs["use_cache"] = False
                out = Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
            if loss_penalty is None:
                return out
            loss, outputs = out if return_outputs else (out, None)
            loss = loss + loss_penalty(model)
            return (loss, outputs) if return_outputs else loss

    return SFTLabsTrainer


@contextlib.contextmanager
def _heap_frozen(frozen: bool):
    """Freeze the objects that exist before training (``gc.freeze``) while it runs, when ``frozen``.

    ``Trainer.train`` starts with accelerate's ``free_memory``, a full ``gc.collect()`` meant to hand
    accelerator memory back; on a CPU it only costs time, and much of it in a notebook process holding
    datasets and earlier runs (``docs/measurements.md``). Frozen objects are skipped by the collector;
    they are unfrozen, and collectable again, when training ends."""
    if not frozen:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _drop_fused_head(model) -> None:
    """Undo TRL's fused-LM-head patch (an instance ``forward`` whose closure holds the *original* model's
    forward). Left in place, ``copy.deepcopy(model)`` would run the original's weights, not the copy's."""
    unwrap_peft(model).__dict__.pop("forward", None)


def train_sft(model, tokenizer, dataset, profile: Profile, peft_config=None, callbacks=(),
              loss_penalty: Callable[[torch.nn.Module], torch.Tensor] | None = None,
              checkpoint_dir: str | Path | None = None, save_steps: int | None = None, **overrides) -> TrainResult:
    """Fine-tune ``model`` on ``dataset`` with TRL's ``SFTTrainer`` and measure the run.

    Args:
        model: a ``transformers`` causal LM (already quantized for QLoRA, if wanted).
        tokenizer: its tokenizer; chat rows need a chat template with generation markers.
        dataset: a ``datasets.Dataset`` of task rows (extra columns are dropped after validation).
        profile: supplies steps, batch size, learning rate, sequence length, device and dtype.
        peft_config: a ``peft`` config (LoRA, DoRA, IA3, ...) or None for full fine-tuning.
        loss_penalty: ``model -> scalar tensor`` added to every step's loss (e.g. an L2-to-base or EWC
            penalty, see :mod:`labhelpers.continual`); the logged loss includes it.
        checkpoint_dir: keep checkpoints there (every ``save_steps`` steps, the last two) and, if it
            already holds one, resume from the latest: optimizer, scheduler, RNG and data order included,
            so an interrupted run ends where an uninterrupted one would.
        overrides: ``SFTConfig`` fields to change for this run, e.g. ``max_steps=50``,
            ``neftune_noise_alpha=5`` or ``assistant_only_loss=False`` (chat rows then train on every
            token; the default, True, on the assistant's).
    """
    overrides = dict(overrides)
    train_dataset, fmt = sft_dataset(dataset, tokenizer, assistant_only=overrides.pop("assistant_only_loss", True))
    run_folder = tracking.new_run(profile, tracking.method_name(model, peft_config))
    if run_folder is not None:
        callbacks = (*callbacks, tracking.training_callback(run_folder))
    recorder = _Recorder(desc="fine-tune" if peft_config is None else f"fine-tune ({type(peft_config).__name__})")
    if checkpoint_dir is not None:
        if not save_steps or save_steps < 1:
            raise ValueError(f"checkpoint_dir needs save_steps >= 1 (how often to save), got {save_steps!r}")
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        overrides = {"save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 2, **overrides}
    resume = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir is not None else None
    with (tempfile.TemporaryDirectory(prefix="sftlabs-train-") if checkpoint_dir is None
          else contextlib.nullcontext(str(checkpoint_dir))) as out:
        torch.manual_seed(profile.seed)
        trainer = trainer_class(loss_penalty, profile.fused_lm_head, profile.length_group)(model=model, args=sft_config(profile, fmt, out, **overrides),
                             train_dataset=train_dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[recorder, *callbacks_for(peft_config), *callbacks])
        trainer.remove_callback(PrinterCallback)  # the recorder's progress bar replaces per-step log lines
        keep_trainable_fp32(trainer.model, profile)
        counts = count_parameters(trainer.model)
        warn_if_too_large(model, peft_config, profile, overrides)
        start = time.perf_counter()
        with measure_peak_memory(profile.device) as peak, _heap_frozen(profile.device == "cpu"):
            trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.perf_counter() - start
    trained = trainer.model
    _drop_fused_head(trained)
    trained.eval()
    tracking.attach(trained, run_folder, trainer.state.global_step)
    steps = len(recorder.step_seconds)
    timed = recorder.step_seconds[1:] or recorder.step_seconds  # the first step pays one-off set-up
    return TrainResult(model=trained, loss_curve=pd.DataFrame(recorder.losses, columns=["step", "loss"]),
                       sec_per_step=statistics.median(timed), peak_mib=peak.peak_mib, train_seconds=train_seconds,
                       steps=steps, trainable_params=counts["trainable"], total_params=counts["total"],
                       train_tokens=int(trainer.train_tokens))


def keep_trainable_fp32(model, profile: Profile) -> int:
    """The dtype policy of every run: under fp16 mixed precision, the parameters being trained are
    fp32 (master weights; the frozen ones stay fp16). The Trainer's gradient scaler refuses fp16
    gradients ("Attempting to unscale FP16 gradients"), and fp16 weights would lose small updates.
    Returns how many tensors were cast (bf16 runs and fp32 runs are left as they are)."""
    if profile.dtype != "float16":
        return 0
    cast = [p for p in model.parameters() if p.requires_grad and p.dtype != torch.float32]
    for p in cast:
        p.data = p.data.float()
    return len(cast)


def warn_if_too_large(model, peft_config, profile: Profile, overrides: dict) -> None:
    """Before training: estimate the run's peak memory (:func:`labhelpers.memory.check_fits`) and warn
    with a :class:`~labhelpers.memory.DoesNotFitWarning` if the device cannot hold it."""
    quantized = any(getattr(p, "quant_state", None) is not None for p in model.parameters())
    base = "full" if peft_config is None else ("qlora" if quantized else "lora")
    method = TrainingMethod(base, gradient_checkpointing=overrides.get("activation_checkpointing",
                                                                       profile.gradient_checkpointing),
                            adam_8bit="8bit" in str(overrides.get("optim", "")))
    check_fits(model, method, overrides.get("per_device_train_batch_size", profile.batch_size),
               overrides.get("max_length") or profile.max_seq_length, profile.device, profile.dtype,
               lora_r=getattr(peft_config, "r", None) or profile.lora_r)


# The fields of an ``SFTConfig`` that make a training recipe (what :func:`fine_tune` takes from a
# config you built); output folder, step count, schedule, logging and saving stay the run's own. The
# loss mask follows the data (:func:`sft_dataset`: the completion of completion rows; the assistant's
# tokens of chat rows under ``assistant_only_loss=True``, every token under False).
RECIPE_FIELDS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                 "fp16", "bf16", "activation_checkpointing", "optim", "weight_decay", "assistant_only_loss",
                 "neftune_noise_alpha")


def recipe_of(args) -> dict:
    """The :data:`RECIPE_FIELDS` of an ``SFTConfig``."""
    return {name: getattr(args, name) for name in RECIPE_FIELDS}


def fine_tune(model, tokenizer, rows, profile: Profile, steps: int, learning_rate: float | None = None,
              peft_config=None, loss_penalty=None, args=None, warmup_steps: float | None = None, callbacks=()):
    """Fine-tune on ``rows`` (a list of rows, or a Dataset: :func:`labhelpers.data.training_dataset`)
    for ``steps`` steps.

    Full fine-tuning uses the profile's ``full_ft_learning_rate`` unless told otherwise, PEFT its
    ``learning_rate`` (:func:`labhelpers.peft_methods.default_learning_rate`). ``args``, an ``SFTConfig``
    you built, supplies the recipe (:data:`RECIPE_FIELDS`: learning rate, batch, accumulation, length,
    precision, checkpointing, optimizer, loss mask, NEFTune noise); ``learning_rate`` still wins when
    given. ``warmup_steps`` (a count, or a fraction of ``steps`` below 1) defaults to 5% of the steps;
    ``callbacks`` go to the Trainer. Returns the :class:`~labhelpers.training.TrainResult`.
    """
    dataset = training_dataset(rows, tokenizer, profile.max_seq_length)
    recipe = recipe_of(args) if args is not None else {}
    recipe_lr = recipe.pop("learning_rate", None)
    lr = learning_rate or recipe_lr or default_learning_rate(peft_config, profile)
    return train_sft(model, tokenizer, dataset, profile, peft_config=peft_config, loss_penalty=loss_penalty,
                     callbacks=callbacks, **recipe, max_steps=steps, learning_rate=lr,
                     warmup_steps=max(1, steps // 20) if warmup_steps is None else warmup_steps)


def main(argv: list[str] | None = None) -> int:
    """``python -m labhelpers.training --task code --steps 40 --save-steps 10 --out DIR``: a resumable
    run of the profile's base model (full fine-tuning, or ``--method lora``); run it again after an
    interruption and it continues from the last checkpoint. Writes ``DIR/result.json``."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--task", default="code")
    parser.add_argument("--profile", default="ci")
    parser.add_argument("--method", default="full", choices=("full", "lora"))
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    profile = profiles.get(args.profile).with_(max_steps=args.steps)
    model, tokenizer = load_model(profile)
    config = make_peft_config(args.method, profile)
    from datasets import Dataset

    rows = Dataset.from_list(task_rows(args.task, "train"))
    result = train_sft(model, tokenizer, rows, profile, peft_config=config, checkpoint_dir=args.out / "checkpoints",
                       save_steps=args.save_steps, learning_rate=default_learning_rate(config, profile))
    curve = result.loss_curve
    report = {"final_loss": result.final_loss, "last_step": int(curve["step"].iloc[-1]),
              "last_step_loss": float(curve["loss"].iloc[-1]), "losses": curve.to_dict("list"), "steps": result.steps}
    tmp = args.out / "result.json.tmp"
    tmp.write_text(json.dumps(report) + "\n")
    tmp.replace(args.out / "result.json")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
