"""``make bench``: performance measured side by side in one run, written to build/bench.md and bench.json.

Every comparison runs its contenders interleaved, ``--repeats`` times, and reports medians and ratios:

* **SFT throughput** on the variable-length ``code`` data: labhelpers' training path
  (:func:`labhelpers.training.train_sft` as the labs run it: chat rows tokenized in batched calls,
  padded batches of rows of similar length drawn four batches at a time, the model's loss with its
  output layer applied at trained positions only) vs the same with random batches vs with TRL's
  padding-free batching vs TRL's ``SFTTrainer`` with its defaults (random padded batches, gradient
  checkpointing, the fused log-prob head, bf16 mixed precision) vs the same with ``bf16=False`` (what a
  CPU without bf16 arithmetic should use: there bf16 is emulated, tens of times slower) vs a plain
  PyTorch loop (random padded batches, the model's own loss); same model, rows, batch size and steps; real (non-padding) tokens per second, data
  preparation included, with the range of the ratio to TRL over the repetitions. Measured twice: on
  the shipped tiny model (``ci``) and on the real model (SmolLM2-135M-Instruct, ``make real-model``,
  :func:`labhelpers.profiles.on_real_model`; fewer steps, since each takes seconds; ``--quick``: one step
  of one row).
* **Merging**: :func:`labhelpers.merging.merge_checkpoints` (streaming, by chunks) vs loading whole
  state dicts, task arithmetic, and streamed TIES, on locally built models of 162M and 276M parameters
  (12 and 24 layers, same largest tensor): wall time and peak RSS of a subprocess, also as a multiple
  of the largest tensor.
* **Quantization**: the lab's reference NF4 quantizer vs bitsandbytes on CPU, elements per second.
* **Memory**: measured peak of a full-length training step per method vs the estimator.
* **Notebooks**: the wall time of each lab as recorded by the last ``make labs`` runs (``build/``), or,
  with ``--run-notebooks ci cpu`` (``make bench-notebooks``), of each lab run now in those profiles.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labhelpers import profiles, sandbox
from labhelpers import quantization as Q
from labhelpers.course.bench_report import write
from labhelpers.course.runner import processor, run_labs
from labhelpers.data import tokenize_rows
from labhelpers.labs import lab4
from labhelpers.models import load_model, load_tokenizer
from labhelpers.paths import build_dir
from labhelpers.tasks import task_rows
from labhelpers.training import train_sft
from labhelpers.units import to_mib


def _median(xs):
    return statistics.median(xs)


# ------------------------------------------------------------------------------------------ training
def _rows(n: int):
    return task_rows("code", "train", n)


def _real_tokens(rows, tokenizer, steps: int, batch_size: int) -> int:
    """Tokens the run really trains on (no padding): ``steps x batch_size`` rows of average length."""
    lengths = [len(r["input_ids"]) for r in tokenize_rows(rows, tokenizer, 10_000)]
    return int(steps * batch_size * statistics.mean(lengths))


def run_labhelpers(profile, rows, steps: int, **overrides) -> float:
    """Seconds from rows to a trained model: dataset preparation and training (model loading excluded)."""
    from datasets import Dataset

    model, tokenizer = load_model(profile)
    start = time.perf_counter()
    train_sft(model, tokenizer, Dataset.from_list(rows), profile.with_(max_steps=steps),
              learning_rate=profile.full_ft_learning_rate, **overrides)
    return time.perf_counter() - start


def run_labhelpers_random_batches(profile, rows, steps: int) -> float:
    """The same path with random batches instead of the profile's length groups (``length_group=0``)."""
    return run_labhelpers(profile.with_(length_group=0), rows, steps)


def run_labhelpers_padding_free(profile, rows, steps: int) -> float:
    """The same path with TRL's padding-free batching (one flattened sequence per batch, a block-diagonal
    mask from the position ids); the losses are identical to padded batches."""
    return run_labhelpers(profile, rows, steps, padding_free=True, max_length=None)


def run_trl_default(profile, rows, steps: int, **config) -> float:
    """TRL's ``SFTTrainer`` with ``SFTConfig``'s defaults, but for the fields the comparison fixes (steps,
    batch size, learning rate, device, seed) and any given in ``config``."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_model(profile)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=profile.batch_size,
                         learning_rate=profile.full_ft_learning_rate, use_cpu=profile.device == "cpu",
                         report_to="none", save_strategy="no", disable_tqdm=True, seed=profile.seed, **config)
        trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]))
        trainer.train()
        return time.perf_counter() - start


def run_trl_fp32(profile, rows, steps: int) -> float:
    """TRL's defaults with ``bf16=False``: fp32 throughout, as the course's path trains on a CPU."""
    return run_trl_default(profile, rows, steps, bf16=False)


def run_plain_loop(profile, rows, steps: int) -> float:
    model, tokenizer = load_model(profile)
    start = time.perf_counter()
    examples = tokenize_rows(rows, tokenizer, profile.max_seq_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=profile.full_ft_learning_rate)
    g = torch.Generator().manual_seed(profile.seed)
    model.train()
    for _ in range(steps):
        batch = [examples[i] for i in torch.randint(len(examples), (profile.batch_size,), generator=g)]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for k, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[k, :n], labels[k, :n], mask[k, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_training(profile, steps: int, repeats: int) -> dict:
    rows = _rows(2000)
    tokens = _real_tokens(rows, load_tokenizer(profile), steps, profile.batch_size)
    contenders = {"labhelpers": run_labhelpers, "labhelpers_random_batches": run_labhelpers_random_batches,
                  "labhelpers_padding_free": run_labhelpers_padding_free,
                  "trl_default": run_trl_default, "trl_fp32": run_trl_fp32, "plain_pytorch": run_plain_loop}
    seconds = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            gc.collect()  # the previous contender's garbage is not this one's to collect
            seconds[name].append(fn(profile, rows, steps))
    out = {name: {"seconds": _median(s), "tokens_per_s": tokens / _median(s), "runs": s} for name, s in seconds.items()}
    for name in contenders:
        out[name]["vs_trl_default"] = out[name]["tokens_per_s"] / out["trl_default"]["tokens_per_s"]
        # each repetition's ratio (the two ran a few seconds apart): the spread the machine's noise allows
        paired = [trl / own for trl, own in zip(seconds["trl_default"], seconds[name])]
        out[name]["vs_trl_default_range"] = [min(paired), max(paired)]
    return {"model": profile.base_model, "steps": steps, "batch_size": profile.batch_size, "real_tokens": tokens,
            "contenders": out}


# ------------------------------------------------------------------------------------------- merging
MERGE_SCRIPT = r"""
import json, sys, time
from pathlib import Path
mode, out, base, a, b = sys.argv[1:6]
from labhelpers.memory import measure_peak_memory
from labhelpers.merging import merge_checkpoints
from safetensors.torch import load_file, save_file
start = time.perf_counter()
# RSS sampled during the merge, minus the RSS after the imports (ru_maxrss would count the parent's
# resident size inherited through fork)
with measure_peak_memory("cpu", interval_s=0.002) as peak:
    if mode == "streaming":
        merge_checkpoints([a, b], out, "task_arithmetic", base=base, lam=1.0)
    elif mode == "streaming_ties":
        merge_checkpoints([a, b], out, "ties", base=base, density=0.2)
    else:
        sd0, sd1, sd2 = (load_file(str(Path(p) / "model.safetensors")) for p in (base, a, b))
        merged = {k: sd0[k] + 1.0 * ((sd1[k] - sd0[k]) + (sd2[k] - sd0[k])) for k in sd0}
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file(merged, str(Path(out) / "model.safetensors"))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak.peak_mib}))
"""


def build_checkpoints(folder: Path, hidden: int, layers: int, vocab: int = 32000) -> tuple[list[Path], dict]:
    """A base and two perturbed copies of a randomly initialized Llama of the given shape (fp32)."""
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         vocab_size=vocab, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    paths = []
    for i, name in enumerate(("base", "expert_a", "expert_b")):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
        model.save_pretrained(folder / name, safe_serialization=True)
        paths.append(folder / name)
    del model
    return paths, {"params": params, "largest_tensor_mib": to_mib(largest), "layers": layers, "hidden": hidden}


def bench_merging(shapes=((768, 12), (768, 24)), repeats: int = 2) -> list[dict]:
    rows = []
    for hidden, layers in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            (base, a, b), info = build_checkpoints(Path(tmp), hidden, layers)
            runs = {"streaming": [], "streaming_ties": [], "whole_state_dicts": []}
            for _ in range(repeats):
                for mode in runs:
                    out = Path(tmp) / f"out-{mode}"
                    done = subprocess.run([sys.executable, "-c", MERGE_SCRIPT, mode, str(out), str(base), str(a), str(b)],
                                          capture_output=True, text=True, check=True)
                    runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
            row = dict(info)
            for mode, results in runs.items():
                row[f"{mode}_seconds"] = _median([r["seconds"] for r in results])
                row[f"{mode}_peak_rss_mib"] = _median([r["peak_rss_mib"] for r in results])
            row["rss_ratio_whole_over_streaming"] = row["whole_state_dicts_peak_rss_mib"] / row["streaming_peak_rss_mib"]
            for mode in runs:
                row[f"{mode}_peak_over_largest_tensor"] = row[f"{mode}_peak_rss_mib"] / row["largest_tensor_mib"]
            row["time_ratio_streaming_over_whole"] = row["streaming_seconds"] / row["whole_state_dicts_seconds"]
            rows.append(row)
    return rows


# -------------------------------------------------------------------------------------- quantization
def bench_quantization(shape=(4096, 4096), repeats: int = 3) -> dict:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    timings = {"reference_nf4": [], "bitsandbytes_nf4": []}
    for _ in range(repeats):
        start = time.perf_counter()
        Q.quantize_nf4(x, 64)
        timings["reference_nf4"].append(time.perf_counter() - start)
        start = time.perf_counter()
        Q.bnb_nf4(x, 64)
        timings["bitsandbytes_nf4"].append(time.perf_counter() - start)
    out = {k: {"seconds": _median(v), "elements_per_s": x.numel() / _median(v)} for k, v in timings.items()}
    out["bitsandbytes_over_reference"] = out["reference_nf4"]["seconds"] / out["bitsandbytes_nf4"]["seconds"]
    return out


# -------------------------------------------------------------------------------------------- memory
def bench_memory(profile) -> list[dict]:
    return lab4.measured_vs_estimated(profile).drop(columns="seconds_per_step").to_dict("records")


# ------------------------------------------------------------------------------------------- sandbox
def bench_sandbox(programs: int = 40, repeats: int = 3) -> dict:
    """Wall time per generated program (a correct function and two asserts), run one after another: a bare
    ``python -I -S`` subprocess (no containment, the floor), the sandbox without namespaces, and with the
    machine's full containment; interleaved, medians over ``repeats``."""
    code, tests = "def f(x):\n    return x + 1\n", ["assert f(41) == 42", "assert f(-1) == 0"]
    full = sandbox.isolation()
    reduced = sandbox.without_namespaces("no namespaces (benchmark)")

    def bare() -> None:
        subprocess.run([sys.executable, "-I", "-S", "-c", code + "\n".join(tests)], check=True, capture_output=True)

    contenders = {"bare_python": bare,
                  "sandbox_process_level": lambda: sandbox.run_python(code, tests, containment=reduced),
                  f"sandbox_{full.level}_level": lambda: sandbox.run_python(code, tests, containment=full)}
    timings: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = time.perf_counter()
            for _ in range(programs):
                run()
            timings[name].append((time.perf_counter() - start) / programs)
    out = {name: {"ms_per_program": 1000 * _median(t)} for name, t in timings.items()}
    for name in out:
        out[name]["vs_bare"] = out[name]["ms_per_program"] / out["bare_python"]["ms_per_program"]
    return {"programs": programs, "isolation": full.describe(), "contenders": out}


# ----------------------------------------------------------------------------------------- notebooks
NOTEBOOK_TARGETS_S = {"ci": {"lab2_domain": 480, "default": 300}, "cpu": {"lab2_domain": 1200, "default": 900}}


def run_notebooks(profiles_: list[str], out: Path, source: Path | None = None) -> Path:
    """Run every lab (``solutions/``, or ``source``) in each profile, one after another, into
    ``out/notebooks/<profile>/``; returns that folder, whose ``runtime.json`` files
    :func:`notebook_timings` reads."""
    root = out / "notebooks"
    for profile in profiles_:
        failed = [run for run in run_labs(root / profile, profile, source) if not run.passed]
        if failed:  # the time of a lab that stopped early measures nothing
            raise RuntimeError("; ".join(f"{run.lab} ({profile}) failed at {run.failure.describe()}" for run in failed))
    return root


def notebook_timings(root: Path | None = None) -> list[dict]:
    """Lab wall times recorded by ``make labs`` (``runtime.json``) under ``root`` and ``root/<profile>``."""
    root = root or build_dir()
    rows = []
    for path in sorted(root.glob("**/runtime.json")):
        record = json.loads(path.read_text())
        targets = NOTEBOOK_TARGETS_S.get(record["profile"], {})
        target = targets.get(path.parent.name, targets.get("default"))
        rows.append({"lab": path.parent.name, "profile": record["profile"], "seconds": record["seconds"],
                     "target_seconds": target, "within_target": target is None or record["seconds"] <= target})
    return rows


# ------------------------------------------------------------------------------------------- report
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks measured side by side; writes bench.md and bench.json")
    parser.add_argument("--out", type=Path, default=build_dir())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--real-model-steps", type=int, default=8, help="steps of each run on the real model")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test of this script")
    parser.add_argument("--only", nargs="*", default=["training", "training_real_model", "merging", "quantization",
                                                      "memory", "sandbox", "notebooks"])
    parser.add_argument("--run-notebooks", nargs="*", default=[], metavar="PROFILE",
                        help="run every lab in these profiles now (e.g. ci cpu) instead of reading the times "
                             "that make labs recorded")
    parser.add_argument("--notebook-source", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    profile = profiles.get("ci")
    results = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": args.repeats,
               "machine": f"{platform.machine()} {processor()}, torch {torch.__version__}"}
    if "training" in args.only:
        results["training"] = bench_training(profile, 4 if args.quick else args.steps, args.repeats)
    if "training_real_model" in args.only:
        real = profiles.on_real_model(profile)
        results["training_real_model"] = bench_training(real.with_(batch_size=1) if args.quick else real,
                                                        1 if args.quick else args.real_model_steps, args.repeats)
    if "merging" in args.only:
        results["merging"] = bench_merging(((64, 2), (64, 4)) if args.quick else ((768, 12), (768, 24)), args.repeats)
    if "quantization" in args.only:
        results["quantization"] = bench_quantization((256, 256) if args.quick else (4096, 4096), args.repeats)
    if "memory" in args.only:
        results["memory"] = bench_memory(profile.with_(batch_size=2, max_seq_length=32) if args.quick else profile)
    if "sandbox" in args.only:
        results["sandbox"] = bench_sandbox(5 if args.quick else 40, args.repeats)
    if "notebooks" in args.only:
        results["notebooks"] = notebook_timings(run_notebooks(args.run_notebooks, args.out, args.notebook_source)
                                                if args.run_notebooks else None)
    md, js = write(results, args.out)
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
