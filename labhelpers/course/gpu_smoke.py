"""``make gpu-smoke``: each lab's core path in the ``t4`` profile, shortened, on a CUDA machine.

Writes ``build/gpu-smoke.json``: per lab the wall time, peak memory
(:func:`labhelpers.memory.measure_peak_memory`: on CUDA ``torch.cuda.max_memory_allocated``, on the
CPU the resident set), time per training step and scores. Meant to finish in under 8 minutes on one
modern GPU (hub models must be downloadable or cached there). ``--dry-run`` runs the very same code on the CPU with the ``smoke``
profile (the test suite does this), so the script cannot rot where no GPU is around.

Core paths: Lab 1 LoRA and QLoRA on code; Lab 2 full fine-tuning on SQL and the forgetting probe;
Lab 3 two experts and their TIES merge; Lab 4 the measured step of full/LoRA/QLoRA next to the estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from labhelpers import merging, profiles
from labhelpers.continual import all_scores
from labhelpers.labs import lab3, lab4
from labhelpers.labs.lab1 import compare_methods
from labhelpers.memory import measure_peak_memory
from labhelpers.models import load_model
from labhelpers.paths import build_dir
from labhelpers.tasks import task_rows
from labhelpers.training import fine_tune


def smoke_lab1(profile) -> dict:
    table = compare_methods(["lora", "qlora"], profile).set_index("method")
    return {m: {"pass_at_1": float(table.loc[m, "score_test"]), "sec_per_step": float(table.loc[m, "sec_per_step"]),
                "trainable_pct": float(table.loc[m, "trainable_pct"])} for m in table.index}


def smoke_lab2(profile) -> dict:
    model, tokenizer = load_model(profile)
    before = all_scores(model, tokenizer, profile)
    run = fine_tune(model, tokenizer, task_rows("sql", "train"), profile, profile.max_steps)
    after = all_scores(run.model, tokenizer, profile)
    return {"before": before, "after": after, "sec_per_step": run.sec_per_step}


def smoke_lab3(profile, work: Path) -> dict:
    code, _ = lab3.train_expert(["code"], profile, work / "code", profile.max_steps)
    sql, _ = lab3.train_expert(["sql"], profile, work / "sql", profile.max_steps)
    report = merging.merge_checkpoints([code, sql], work / "ties", "ties",
                                       base=lab3.local_checkpoint(profile.base_model), density=0.5)
    return {"merge_seconds": report.seconds, "merged": lab3.score_folder(report.folder, profile)}


def smoke_lab4(profile) -> dict:
    table = lab4.measured_vs_estimated(profile, ("full", "lora", "qlora+gc"))
    return {row.pop("method"): row for row in table.to_dict("records")}


def smoke_profile(dry_run: bool):
    """``smoke`` on the CPU for a dry run; else ``t4`` cut to a few minutes."""
    if dry_run:
        return profiles.get("smoke")
    return profiles.get("t4").with_(name="t4-smoke", max_steps=30, n_eval=32, eval_batch_size=32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU with the smoke profile")
    parser.add_argument("--out", type=Path, default=build_dir() / "gpu-smoke.json")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run to check the script on the CPU")
        return 2
    profile = smoke_profile(args.dry_run)
    report = {"profile": profile.name, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run
              else "cpu", "torch": torch.__version__, "labs": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sftlabs-gpu-smoke-") as tmp:
        for name, fn in (("lab1_peft", smoke_lab1), ("lab2_domain", smoke_lab2),
                         ("lab3_merging", lambda p: smoke_lab3(p, Path(tmp))), ("lab4_memory", smoke_lab4)):
            start = time.perf_counter()
            with measure_peak_memory(profile.device) as peak:  # CUDA: max_memory_allocated; CPU: resident set
                result = fn(profile)
            report["labs"][name] = {"seconds": time.perf_counter() - start, "peak_mib": peak.peak_mib, **result}
            print(f"{name}: {report['labs'][name]['seconds']:.0f} s", flush=True)
    report["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
