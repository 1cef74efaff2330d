"""``make gpu-smoke``: each lab's core path in the ``t4`` profile, shortened, on a CUDA machine.

It starts with the unit tests on that machine (``pytest -m "not slow"``, unless ``--skip-unit-tests``),
then runs the labs' own drivers and writes ``build/gpu-smoke.json``: the unit-test counts, and per lab
the wall time, peak memory (:func:`labhelpers.memory.measure_peak_memory`: on CUDA
``torch.cuda.max_memory_allocated``, on the CPU the resident set), time per training step, training
throughput (tokens/s, padding excluded) and scores. Meant to finish in under 8 minutes on one modern
GPU. The hub models must be downloadable or cached there; on a machine without a network,
``--stand-ins`` runs the same ``t4`` code path on CUDA with the hub-shaped stand-ins of
:mod:`labhelpers.course.rehearsal` (the rehearsal counts: dtype behaviour is real, scores are not), and
``--stand-ins --full-size`` with the profile's base model built at its real shape with random weights
and the shortened profile's real lengths and batches (speed and memory are the real model's; scores
are noise). ``--profile gpu-24gb`` smokes the other GPU profile. A lab that fails is recorded with its
traceback and the next one still runs. ``--dry-run`` runs the very same code on the CPU with the ``smoke`` profile
(the test suite does this), so the script cannot rot where no GPU is around.

Core paths: Lab 1 LoRA and QLoRA on code; Lab 1b the same QLoRA recipe through ``axolotl train`` (its
own environment, with Axolotl's LoRA kernels on a GPU), and through Unsloth against the course's code,
each in its own process (tokens/s, ``max_memory_allocated``/``reserved``, loss parity); Lab 2 full fine-tuning on SQL and the forgetting probe;
Lab 2b a three-trial search (TPE, median pruner) on the smallest base;
Lab 3 two experts and their TIES merge; Lab 4 the measured step of full/LoRA/QLoRA next to the estimate,
and DeepSpeed ZeRO-2 with its optimizer states on the GPU and offloaded to the CPU (ZeRO-Offload).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from labhelpers import axolotl_cli, hyperparameters, merging, profiles
from labhelpers.course import rehearsal
from labhelpers.continual import all_scores
from labhelpers.evaluation import score
from labhelpers.labs import backend_comparison, lab1b, lab3, lab4, sharding_demo
from labhelpers.labs.lab1 import compare_methods
from labhelpers.memory import measure_peak_memory
from labhelpers.models import load_model
from labhelpers.paths import REPO_ROOT, accelerate_config, build_dir
from labhelpers.tasks import task_rows
from labhelpers.training import fine_tune


def smoke_lab1(profile) -> dict:
    table = compare_methods(["lora", "qlora"], profile).set_index("method")
    return {m: {"pass_at_1": float(table.loc[m, "score_test"]), "sec_per_step": float(table.loc[m, "sec_per_step"]),
                "tokens_per_sec": float(table.loc[m, "tokens_per_sec"]),
                "trainable_pct": float(table.loc[m, "trainable_pct"])} for m in table.index}


def smoke_lab1b(profile, work: Path) -> dict:
    """Lab 1's QLoRA recipe through ``axolotl train`` (Axolotl's environment; on a GPU with its LoRA
    kernels), then its adapter scored with the course's peft."""
    run_profile, work = lab1b.comparison_profile(profile), work / "axolotl"
    cfg = lab1b.recipe_config(run_profile, lab1b.write_train_split(work / "train.jsonl"))
    config_path = axolotl_cli.write_config(lab1b.run_settings(cfg, run_profile, work), work / "qlora.yaml")
    training = axolotl_cli.run(["train", config_path, "--launcher", "python"], work / "train.log")
    curve = axolotl_cli.loss_log(training.text())
    model, tokenizer = lab1b.nf4_adapter_model(run_profile, work / "adapter")
    return {"steps": len(curve), "first_loss": float(curve["loss"].iloc[0]), "final_loss": float(curve["loss"].iloc[-1]),
            "train_seconds": training.seconds, "pass_at_1": score(model, tokenizer, "code", run_profile)}


def smoke_unsloth(profile, work: Path) -> dict:
    """Lab 1b's backend comparison: the QLoRA recipe through the course's code and through Unsloth, each
    in its own process (on a GPU with Unsloth's kernels): tokens/s, peak CUDA memory, loss parity."""
    spec = backend_comparison.qlora_spec(profile, work / "backends")
    runs = {"course": backend_comparison.run_course(spec, work / "backends" / "course"),
            "unsloth": backend_comparison.run_unsloth(spec, work / "backends" / "unsloth")}
    table = backend_comparison.comparison(runs)
    reserved = [runs[name].max_memory_reserved_mib for name in ("unsloth", "course")]
    return {**table.astype(object).where(table.notna(), None).to_dict("index"),
            "parity": backend_comparison.loss_parity(runs["course"], runs["unsloth"]),
            "unsloth_vs_course_tokens_per_s": table.loc["unsloth", "tokens_per_s"] / table.loc["course", "tokens_per_s"],
            "unsloth_vs_course_reserved": None if None in reserved else reserved[0] / reserved[1],
            "quantization": {name: run.quantization for name, run in runs.items()},
            "versions": {name: run.versions for name, run in runs.items()}}


def smoke_lab2(profile) -> dict:
    model, tokenizer = load_model(profile)
    before = all_scores(model, tokenizer, profile)
    run = fine_tune(model, tokenizer, task_rows("sql", "train"), profile, profile.max_steps)
    after = all_scores(run.model, tokenizer, profile)
    return {"before": before, "after": after, "sec_per_step": run.sec_per_step, "tokens_per_sec": run.tokens_per_second}


def smoke_lab2b(profile) -> dict:
    """One in-memory study (TPE, median pruner) of three trials: the smallest base on SQL."""
    import optuna

    def new_study(model_name: str, task: str):
        return optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=profile.seed),
                                   pruner=optuna.pruners.MedianPruner(n_startup_trials=1))

    smallest = profile.with_(sweep_models=profile.sweep_models[:1])
    studies, _ = hyperparameters.run_studies(new_study, lambda t: hyperparameters.lora_search_space(t, profile),
                                             smallest, ["sql"], profile.search_steps, n_trials=3)
    trials = hyperparameters.trials_table(studies)
    return {"trials": len(trials), "pruned": int((trials["state"] == "pruned").sum()),
            "best_validation_sql": float(trials["score"].max()), "train_seconds": float(trials["train_seconds"].sum())}


def smoke_lab3(profile, work: Path) -> dict:
    code, code_run = lab3.train_expert(["code"], profile, work / "code", profile.max_steps)
    sql, sql_run = lab3.train_expert(["sql"], profile, work / "sql", profile.max_steps)
    report = merging.merge_checkpoints([code, sql], work / "ties", "ties",
                                       base=lab3.local_checkpoint(profile.base_model), density=0.5)
    return {"tokens_per_sec": {"code": code_run.tokens_per_second, "sql": sql_run.tokens_per_second},
            "merge_seconds": report.seconds, "merged": lab3.score_folder(report.folder, profile)}


def smoke_lab4(profile, work: Path) -> dict:
    table = lab4.measured_vs_estimated(profile, ("full", "lora", "qlora+gc"))
    steps = {row.pop("method"): row for row in table.to_dict("records")}
    return {**steps, "zero_offload": zero_offload(profile, work)}


def zero_offload(profile, work: Path) -> dict:
    """DeepSpeed ZeRO-2 of the profile's base model in one process through ``accelerate launch``, its
    optimizer states (fp32 master copy and moments) kept on the device, then offloaded to the CPU
    (ZeRO-Offload): where they lived, the bytes of each part and the device's peak (CUDA's
    ``max_memory_allocated``; None on a CPU, where a dry run only checks the code path)."""
    runs = {}
    for offload in (False, True):
        [rank] = sharding_demo.launch(1, work / f"zero2-offload-{offload}.json", profile,
                                      config=accelerate_config("deepspeed_zero2"), offload_optimizer=offload,
                                      steps=3, batch_size=profile.batch_size, seq_len=profile.max_seq_length)
        runs["offloaded" if offload else "on device"] = {k: rank[k] for k in (
            "optimizer_device", "device_peak_mib", "weights", "gradients", "optimizer", "mixed_precision", "losses")}
    return runs


def smoke_profile(dry_run: bool, stand_ins: bool = False, full_size: bool = False, name: str = "t4"):
    """``smoke`` on the CPU for a dry run; the GPU profile's rehearsal on CUDA with the tiny stand-ins;
    else the GPU profile cut to a few minutes (with ``full_size``: on the full-size stand-ins)."""
    if dry_run:
        return profiles.get("smoke")
    if stand_ins and not full_size:
        return profiles.get(name).rehearsal().with_(name=f"{name}-stand-ins", device="cuda")
    return profiles.get(name).with_(name=f"{name}-smoke{'-full-size-stand-ins' if full_size else ''}",
                                    max_steps=30, search_steps=30, n_eval=32, eval_batch_size=32)


def run_unit_tests(root: Path | None = None) -> dict:
    """``pytest -m "not slow"`` in a child process on this machine: counts from its JUnit report, the
    exit code and the first failures' names (the suite must pass where CUDA exists too)."""
    root = root or REPO_ROOT
    with tempfile.TemporaryDirectory(prefix="sftlabs-unit-") as tmp:
        report = Path(tmp) / "junit.xml"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                               f"--junitxml={report}", "tests"], cwd=root, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if not report.exists():
            return {"returncode": proc.returncode, "seconds": seconds, "error": (proc.stdout + proc.stderr)[-2000:]}
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
    return {"returncode": proc.returncode, "seconds": seconds, **counts, "failed": failed[:20]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU with the smoke profile")
    parser.add_argument("--stand-ins", action="store_true",
                        help="offline: the t4 code path on CUDA with the hub-shaped stand-in models")
    parser.add_argument("--full-size", action="store_true",
                        help="with --stand-ins: the base model at its real shape (random weights)")
    parser.add_argument("--profile", default="t4", choices=("t4", "gpu-24gb"), help="the GPU profile to smoke")
    parser.add_argument("--skip-unit-tests", action="store_true", help="do not run the unit tests first")
    parser.add_argument("--out", type=Path, default=build_dir() / "gpu-smoke.json")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run to check the script on the CPU")
        return 2
    if args.full_size and not args.stand_ins:
        parser.error("--full-size builds stand-ins: pass it with --stand-ins")
    profile = smoke_profile(args.dry_run, args.stand_ins, args.full_size, args.profile)
    if args.stand_ins and not args.dry_run:
        env = rehearsal.environment(rehearsal.build(full_size=(profile.base_model,) if args.full_size else ()))
        if any(os.environ.get(key) != value for key, value in env.items()):
            # huggingface_hub reads these when it is imported, which this module has done: start again under them
            argv = sys.argv[1:] if argv is None else argv
            os.execve(sys.executable, [sys.executable, "-m", "labhelpers.course.gpu_smoke", *argv], {**os.environ, **env})
    report = {"profile": profile.name, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run
              else "cpu", "torch": torch.__version__, "labs": {}}
    if not (args.dry_run or args.skip_unit_tests):  # a dry run is itself part of the test suite
        report["unit_tests"] = run_unit_tests()
        print(f"unit tests: {report['unit_tests']}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sftlabs-gpu-smoke-") as tmp:
        for name, fn in (("lab1_peft", smoke_lab1), ("lab1b_axolotl", lambda p: smoke_lab1b(p, Path(tmp))),
                         ("lab1b_unsloth", lambda p: smoke_unsloth(p, Path(tmp))),
                         ("lab2_domain", smoke_lab2), ("lab2b_hyperparameters", smoke_lab2b),
                         ("lab3_merging", lambda p: smoke_lab3(p, Path(tmp))),
                         ("lab4_memory", lambda p: smoke_lab4(p, Path(tmp)))):
            start = time.perf_counter()
            try:
                with measure_peak_memory(profile.device) as peak:  # CUDA: max_memory_allocated; CPU: resident set
                    result = fn(profile)
            except Exception:  # noqa: BLE001 - a smoke run reports every lab's failure, not only the first
                result = {"error": traceback.format_exc()}
                print(result["error"], flush=True)
            else:
                result = {"peak_mib": peak.peak_mib, **result}
            report["labs"][name] = {"seconds": time.perf_counter() - start, **result}
            print(f"{name}: {report['labs'][name]['seconds']:.0f} s{' FAILED' if 'error' in result else ''}", flush=True)
    report["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    failed = report.get("unit_tests", {}).get("returncode") or any("error" in lab for lab in report["labs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
