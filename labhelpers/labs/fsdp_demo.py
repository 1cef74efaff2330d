"""A real FSDP run of the shipped base model, launched with ``accelerate launch`` (Lab 4, part 6).

    accelerate launch --config_file labhelpers/configs/accelerate/fsdp_cpu_2proc.yaml -m labhelpers.labs.fsdp_demo --out out.json

Each rank trains a few steps on its own micro-batch and reports the bytes *it* holds of weights,
gradients and AdamW states (the local shards); rank 0 writes them all to ``--out``. With N ranks and
full sharding (ZeRO-3), each holds about 1/N of each part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard

from labhelpers import profiles
from labhelpers.memory import make_batch
from labhelpers.models import load_model
from labhelpers.paths import accelerate_config


def local_bytes(tensors) -> int:
    """Bytes of this rank's part of each tensor (the local shard of a DTensor)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


CPU_CONFIG = accelerate_config("fsdp_cpu_2proc")


def launch(num_processes: int, out: Path, profile: str = "ci", config: Path = CPU_CONFIG, timeout_s: float = 300,
           **options) -> list[dict]:
    """Run this demo on ``profile``'s base model in ``num_processes`` processes (1: plain Python, no
    sharding; more: ``accelerate launch`` with ``config``) and return each rank's report. ``options``:
    ``steps``, ``batch_size``, ``seq_len``. Raises RuntimeError with the launcher's output when the run fails."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    out = Path(out)
    out.unlink(missing_ok=True)
    flags = [f"--profile={profile}", *(f"--{k.replace('_', '-')}={v}" for k, v in options.items())]
    if num_processes == 1:
        command = [sys.executable, "-m", "labhelpers.labs.fsdp_demo", "--out", str(out), *flags]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", str(num_processes), "-m", "labhelpers.labs.fsdp_demo", "--out", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"the {num_processes}-process run failed (exit {done.returncode}):\n{done.stdout[-2000:]}"
                           f"\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def shard_layers(model, reshard_after_forward: bool = True) -> None:
    """FSDP2 full sharding as accelerate's TRANSFORMER_BASED_WRAP does it: each decoder layer, then the
    root (embeddings, final norm, head). Each rank keeps 1/world_size of every parameter."""
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)


def main(argv=None) -> dict:
    from accelerate import Accelerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="ci", help="whose base model to shard (a profile name)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # two processes on two cores
    on_cpu = not torch.cuda.is_available()
    accelerator = Accelerator(cpu=on_cpu)
    profile = profiles.get(args.profile)
    model, _ = load_model(profile)
    model.config.use_cache = False
    sharded = accelerator.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false") == "true"
    if sharded and on_cpu:
        shard_layers(model, reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true") == "true")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if not (sharded and on_cpu):  # a sharded model is already distributed; prepare would wrap it in DDP
        model, optimizer = accelerator.prepare(model, optimizer)
    batch = make_batch(model.config.vocab_size, args.batch_size, args.seq_len, seed=accelerator.process_index)
    losses = []
    for _ in range(args.steps):
        loss = model(**batch).loss
        accelerator.backward(loss)
        grads = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    report = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "profile": profile.name,
              "distributed_type": str(accelerator.distributed_type), "fsdp": sharded, "weights": local_bytes(model.parameters()),
              "gradients": grads, "optimizer": local_bytes(states), "losses": losses}
    reports = [None] * accelerator.num_processes
    if accelerator.num_processes > 1:
        torch.distributed.all_gather_object(reports, report)
    else:
        reports = [report]
    if accelerator.is_main_process:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(reports, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


if __name__ == "__main__":
    main()
    # Leave without running C++ static destructors: with gloo, one of torch's worker threads can still
    # be joinable when they run, and the process then aborts ("terminate called without an active
    # exception", about 1 run in 6 on 2 cores) after its work is done and reported.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
