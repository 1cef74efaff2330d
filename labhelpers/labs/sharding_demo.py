"""Real sharded training of the shipped base model, launched with ``accelerate launch`` (Lab 4, part 6):
FSDP full sharding, or DeepSpeed ZeRO stage 2 or 3, whichever the accelerate config names.

    accelerate launch --config_file labhelpers/configs/accelerate/fsdp_cpu_2proc.yaml -m labhelpers.labs.sharding_demo --out out.json
    accelerate launch --config_file labhelpers/configs/accelerate/deepspeed_zero3.yaml --num_processes 2 --mixed_precision no -m labhelpers.labs.sharding_demo --out out.json

Each rank trains a few steps on its own micro-batch and reports the bytes *it* holds of weights,
gradients and optimizer states (its local shards); rank 0 writes them all to ``--out``.

On a CPU (gloo), accelerate applies neither plugin: its FSDP plugin does not shard, and its state sets
DeepSpeed up only on an accelerator (``accelerate.state.PartialState`` starts DeepSpeed's communication
only when ``cpu`` is false and a GPU backend was found). So this script reads the same settings from the
environment ``accelerate launch`` sets from the config and applies them itself: torch's ``fully_shard``
on each decoder layer, or ``deepspeed.initialize`` with the config's ZeRO stage (DeepSpeed's CPU
accelerator falls back to gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from torch.distributed.fsdp import fully_shard

from labhelpers import memory, profiles  # memory's parts load on first use: the ranks never import peft
from labhelpers.models import load_model
from labhelpers.paths import accelerate_config
from labhelpers.units import MiB

CPU_CONFIG = accelerate_config("fsdp_cpu_2proc")
PARTS = ("weights", "gradients", "optimizer")
# gradients clipped to this norm, as the Trainer's default max_grad_norm and the shipped DeepSpeed configs'
# gradient_clipping do: every run then takes the same step (clipping rescales Adam's later updates)
MAX_GRAD_NORM = 1.0


def local_bytes(tensors) -> int:
    """Bytes of this rank's part of each tensor (the local shard of a DTensor); None entries count 0."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


MIXED_PRECISION = {"float16": "fp16", "bfloat16": "bf16"}  # a profile's dtype -> accelerate's mixed_precision


def mixed_precision(profile: profiles.Profile) -> str:
    """accelerate's ``mixed_precision`` for ``profile``: its dtype's on a GPU, ``no`` on a CPU (the
    rehearsal of a GPU profile included: DeepSpeed's half-precision optimizers are a GPU path)."""
    on_gpu = profile.device == "cuda" and torch.cuda.is_available()
    return MIXED_PRECISION.get(profile.dtype, "no") if on_gpu else "no"


def launch(num_processes: int, out: Path, profile: str | profiles.Profile = "ci", config: Path | None = None,
           timeout_s: float = 300, offload_optimizer: bool = False, **options) -> list[dict]:
    """Run this demo on ``profile``'s base model (a profile or its name) in ``num_processes`` processes and
    return each rank's report. Without ``config``, one process is plain Python (no sharding) and more are
    FSDP (:data:`CPU_CONFIG`); with one, ``accelerate launch`` runs it, its process count replaced by
    ``num_processes`` and its mixed precision by :func:`mixed_precision`. ``offload_optimizer`` moves a
    DeepSpeed run's optimizer states to the CPU (ZeRO-Offload). ``options``: ``steps``, ``batch_size``,
    ``seq_len``. Raises RuntimeError with the launcher's output when the run fails."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if config is None and num_processes > 1:
        config = CPU_CONFIG
    if offload_optimizer and (config is None or "deepspeed" not in Path(config).stem):
        raise ValueError(f"offload_optimizer is a DeepSpeed setting; pass a deepspeed config, not {config}")
    out = Path(out)
    out.unlink(missing_ok=True)
    profile = profiles.get(profile) if isinstance(profile, str) else profile
    flags = [f"--profile={profile.to_json()}",
             *(f"--{k.replace('_', '-')}={v}" for k, v in options.items())]
    module = ["-m", "labhelpers.labs.sharding_demo", "--out", str(out), *flags]
    if config is None:
        command = [sys.executable, *module]
    else:
        precision = ["--mixed_precision", mixed_precision(profile)]
        offload = ["--offload_optimizer_device", "cpu"] if offload_optimizer else []
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", str(num_processes), *precision, *offload, *module]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"the {num_processes}-process run failed (exit {done.returncode}):\n{done.stdout[-2000:]}"
                           f"\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def formula_bytes(report: dict) -> dict[str, float]:
    """What :func:`labhelpers.memory.zero_per_gpu` predicts for one rank of ``report``'s run: FSDP full
    sharding is stage 3 with AdamW's two moments (8 bytes per parameter, no master copy when the weights
    are fp32); DeepSpeed's ZeRO keeps an fp32 master copy besides the moments (K = 12) whatever the
    weights' dtype; one process is stage 0."""
    stage = report["zero_stage"] if report["sharding"] != "none" else 0
    optimizer = 12 if report["sharding"] == "deepspeed" else 8
    width = report["bytes_per_weight"]
    return memory.zero_per_gpu(report["params"], report["world_size"], stage, weight_bytes=width, grad_bytes=width,
                               optimizer_bytes=optimizer)


def rank_table(single: list[dict], runs: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per rank of the one-process run and of each named sharded run: the MiB it held of each
    part beside :func:`formula_bytes`'s prediction, the largest gap between them (%), and its share of
    what the one process held."""
    whole = sum(single[0][part] for part in PARTS)
    rows = []
    for name, ranks in {"one process": single, **runs}.items():
        for r in ranks:
            expected = formula_bytes(r)
            row = {"run": name, "rank": r["rank"], "processes": r["world_size"], "ZeRO stage": r["zero_stage"]}
            row |= {f"{part} (MiB)": r[part] / MiB for part in PARTS}
            row |= {f"{part}, formula (MiB)": expected[part] / MiB for part in PARTS}
            row["largest gap to formula (%)"] = max(100 * abs(r[p] - expected[p]) / expected[p] for p in PARTS)
            row["share of one process"] = sum(r[part] for part in PARTS) / whole
            rows.append(row)
    return pd.DataFrame(rows)


def loss_gap(single: list[dict], runs: dict[str, list[dict]]) -> float:
    """The largest relative difference between the losses of the sharded runs, rank by rank and step by
    step, against the first of ``runs``, and between that run's first loss on rank 0 and the one
    process's (the same weights and first batch, before any update). Data parallelism averages the
    gradients, so every sharding takes the same step: this is about float rounding (1e-7 to 1e-5)."""
    names = list(runs)
    if not names:
        raise ValueError("no sharded run to compare; pass {name: reports} from launch(2, ...)")
    reference = runs[names[0]]
    gaps = [abs(reference[0]["losses"][0] - single[0]["losses"][0]) / abs(single[0]["losses"][0])]
    for name in names[1:]:
        if [len(r["losses"]) for r in runs[name]] != [len(r["losses"]) for r in reference]:
            raise ValueError(f"{name} ran other ranks or steps than {names[0]}; launch both with the same options")
        gaps += [abs(a - b) / abs(b) for ours, theirs in zip(runs[name], reference)
                 for a, b in zip(ours["losses"], theirs["losses"])]
    return max(gaps)


def shard_layers(model, reshard_after_forward: bool = True) -> None:
    """FSDP2 full sharding as accelerate's TRANSFORMER_BASED_WRAP does it: each decoder layer, then the
    root (embeddings, final norm, head). Each rank keeps 1/world_size of every parameter."""
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)


def deepspeed_config(micro_batch: int, world_size: int) -> dict:
    """The DeepSpeed config ``accelerate launch`` set up from the accelerate config (its ZeRO stage,
    offload devices, clipping, mixed precision), read through accelerate's own ``DeepSpeedPlugin``, with
    the batch sizes accelerate would fill in for its ``auto`` entries."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
    config = json.loads(json.dumps(plugin.deepspeed_config, default=str))
    config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if v != "auto"}
    accumulation = config.get("gradient_accumulation_steps", 1)
    config.update(train_micro_batch_size_per_gpu=micro_batch,
                  train_batch_size=micro_batch * accumulation * world_size)
    if config["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu":
        # ZeRO-Offload with torch's AdamW stepping on the CPU (DeepSpeedCPUAdam would need a compiled op)
        config["zero_force_ds_cpu_optimizer"] = False
    return {k: v for k, v in config.items() if v != "auto"}


class _DeepSpeedRun:
    """A model trained by ``deepspeed.initialize``; the bytes each rank holds read from its ZeRO optimizer."""

    def __init__(self, model, micro_batch: int):
        import deepspeed

        deepspeed.init_distributed()  # gloo through DeepSpeed's CPU accelerator; NCCL on GPUs
        self.config = deepspeed_config(micro_batch, torch.distributed.get_world_size())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.stage = self.engine.zero_optimization_stage()

    def step(self, batch) -> tuple[float, int]:
        loss = self.engine(**{k: v.to(self.engine.device) for k, v in batch.items()}).loss
        self.engine.backward(loss)
        grads = self.optimizer.averaged_gradients  # this rank's reduced gradient partition
        held = local_bytes(g for group in (grads.values() if isinstance(grads, dict) else grads) for g in group or [])
        if not held:  # ZeRO-Offload reduces straight into the fp32 master partition's .grad, on the CPU
            held = local_bytes(m.grad for m in self._master())
        self.engine.step()
        return float(loss.detach()), held

    def _master(self) -> list:
        """The fp32 master partitions of this rank (ZeRO-1/2, then ZeRO-3 naming)."""
        master = getattr(self.optimizer, "single_partition_of_fp32_groups", None)
        return master if master is not None else self.optimizer.fp32_partitioned_groups_flat

    def held(self) -> dict:
        """Weights (the local ``ds_tensor`` of a ZeRO-3 parameter, else the whole tensor), the fp32 master
        partition and the inner optimizer's moments."""
        master = self._master()
        params = list(self.engine.module.parameters())
        moments = [v for s in self.optimizer.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0]
        local = [getattr(p, "ds_tensor", p) for p in params]
        return {"weights": local_bytes(local), "bytes_per_weight": local[0].element_size(),
                "master": local_bytes(master), "moments": local_bytes(moments),
                "optimizer_device": str(master[0].device)}


def main(argv=None) -> dict:
    from accelerate import Accelerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="ci",
                        help="whose base model to shard: a profile's name or its fields as JSON")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # two processes on two cores
    on_cpu = not torch.cuda.is_available()
    profile = profiles.from_json(args.profile) if args.profile.startswith("{") else profiles.get(args.profile)
    model, _ = load_model(profile)
    # fp32 weights whatever the profile's dtype, so that every run holds what the formulas assume for
    # fp32 master weights (the course's fp16 runs keep their trained weights fp32 too); DeepSpeed's
    # fp16/bf16 modes make their own half copy from these
    model = model.float()
    model.config.use_cache = False
    bytes_per_weight = next(model.parameters()).element_size()
    params = sum(p.numel() for p in model.parameters())
    losses, grads = [], 0
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true":
        run = _DeepSpeedRun(model, args.batch_size)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        batch = memory.make_batch(model.config.vocab_size, args.batch_size, args.seq_len, seed=rank)
        for _ in range(args.steps):
            loss, grads = run.step(batch)
            losses.append(loss)
        held = run.held()
        report = {"sharding": "deepspeed", "zero_stage": run.stage, "weights": held["weights"], "gradients": grads,
                  "optimizer": held["master"] + held["moments"], "master": held["master"],
                  "bytes_per_weight": held["bytes_per_weight"], "optimizer_device": held["optimizer_device"],
                  "mixed_precision": next((m for m in ("fp16", "bf16") if run.config.get(m, {}).get("enabled")), "no")}
        finish = torch.distributed.barrier
    else:
        accelerator = Accelerator(cpu=on_cpu)
        rank, world = accelerator.process_index, accelerator.num_processes
        sharded = world > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false") == "true"
        if sharded and on_cpu:
            shard_layers(model, reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true") == "true")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if not (sharded and on_cpu):  # a sharded model is already distributed; prepare would wrap it in DDP
            model, optimizer = accelerator.prepare(model, optimizer)
        batch = memory.make_batch(model.config.vocab_size, args.batch_size, args.seq_len, seed=rank)
        for _ in range(args.steps):
            loss = model(**batch).loss
            accelerator.backward(loss)
            grads = local_bytes(p.grad for p in model.parameters())
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)  # the norm over every shard
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        report = {"sharding": "fsdp" if sharded else "none", "zero_stage": 3 if sharded else 0,
                  "optimizer_device": str(accelerator.device),
                  "weights": local_bytes(model.parameters()), "gradients": grads, "optimizer": local_bytes(states),
                  "master": 0, "mixed_precision": accelerator.mixed_precision}
        finish = accelerator.wait_for_everyone
    peak = torch.cuda.max_memory_allocated() / MiB if torch.cuda.is_available() else None
    report = {"rank": rank, "world_size": world, "profile": profile.name, "params": params,
              "bytes_per_weight": bytes_per_weight, "device_peak_mib": peak, **report,
              "fsdp": report["sharding"] == "fsdp", "losses": losses}
    reports = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(reports, report)
    else:
        reports = [report]
    if rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(reports, indent=2) + "\n")
    finish()
    return report


if __name__ == "__main__":
    main()
    # Leave without running C++ static destructors: with gloo, one of torch's worker threads can still
    # be joinable when they run, and the process then aborts ("terminate called without an active
    # exception", about 1 run in 6 on 2 cores) after its work is done and reported.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
