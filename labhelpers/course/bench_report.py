"""``build/bench.md``: the tables of a ``make bench`` run (:mod:`labhelpers.course.bench`), from its results."""

from __future__ import annotations

import json
from pathlib import Path


def _training_table(t: dict) -> list[str]:
    lines = [f"## SFT throughput on {t['model']} (code task, full fine-tuning, real tokens per second)", "",
             f"{t['steps']} steps of batch {t['batch_size']}, {t['real_tokens']} real tokens per run.", "",
             "| path | seconds | tokens/s | vs TRL default | range over repetitions |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.2f} | {v['tokens_per_s']:.0f} | {v['vs_trl_default']:.2f}x | "
              f"{v['vs_trl_default_range'][0]:.2f}-{v['vs_trl_default_range'][1]:.2f}x |"
              for k, v in t["contenders"].items()]
    return lines + [""]


def write(results: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# SFT Labs benchmark", "", f"Measured {results['when']} on {results['machine']}; medians of "
             f"{results['repeats']} interleaved repetitions.", ""]
    for key in ("training", "training_real_model"):
        if key in results:
            lines += _training_table(results[key])
    if "merging" in results:
        lines += ["## Merging: streaming vs whole state dicts (2 experts + base, float32)", "",
                  "Task arithmetic streamed by labhelpers.merging, the same loaded as whole state dicts, and TIES "
                  "(density 0.2) streamed. Peak RSS is the growth over the process's resident size after its "
                  "imports; x largest = peak RSS / the largest tensor's size.", "",
                  "| params | layers | largest tensor MiB | streaming s | whole s | TIES s | streaming peak MiB (x largest) "
                  "| whole peak MiB (x largest) | TIES peak MiB (x largest) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['params'] / 1e6:.0f}M | {r['layers']} | {r['largest_tensor_mib']:.0f} | {r['streaming_seconds']:.2f} | "
                  f"{r['whole_state_dicts_seconds']:.2f} | {r['streaming_ties_seconds']:.2f} | "
                  f"{r['streaming_peak_rss_mib']:.0f} ({r['streaming_peak_over_largest_tensor']:.2f}) | "
                  f"{r['whole_state_dicts_peak_rss_mib']:.0f} ({r['whole_state_dicts_peak_over_largest_tensor']:.1f}) | "
                  f"{r['streaming_ties_peak_rss_mib']:.0f} ({r['streaming_ties_peak_over_largest_tensor']:.2f}) |"
                  for r in results["merging"]]
        lines.append("")
    if "quantization" in results:
        q = results["quantization"]
        lines += ["## NF4 quantization of a 4096 x 4096 weight on CPU", "", "| quantizer | seconds | elements/s |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v['seconds']:.3f} | {v['elements_per_s']:.3g} |" for k, v in q.items() if isinstance(v, dict)]
        lines += ["", f"bitsandbytes is {q['bitsandbytes_over_reference']:.2f}x the reference's speed.", ""]
    if "memory" in results:
        lines += ["## Memory: measured peak vs the estimator (full-length step)", "",
                  "| method | measured MiB | estimated MiB | estimate / measured |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['measured_peak_mib']:.1f} | {r['estimated_peak_mib']:.1f} | {r['estimate_over_measured']:.3f} |"
                  for r in results["memory"]]
        lines.append("")
    if "sandbox" in results:
        b = results["sandbox"]
        lines += ["## Sandbox: wall time per generated program", "",
                  f"{b['programs']} programs one after another (a function and two asserts). This machine: "
                  f"{b['isolation']}.", "", "| run | ms per program | vs bare python |", "|---|---|---|"]
        lines += [f"| {k} | {v['ms_per_program']:.1f} | {v['vs_bare']:.2f}x |" for k, v in b["contenders"].items()]
        lines.append("")
    if results.get("notebooks"):
        lines += ["## Notebooks (wall time of each lab)", "", "| lab | profile | seconds | target | ok |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['lab']} | {r['profile']} | {r['seconds']:.0f} | {r['target_seconds']} | {r['within_target']} |"
                  for r in results["notebooks"]]
        lines.append("")
    (out / "bench.md").write_text("\n".join(lines))
    return out / "bench.md", out / "bench.json"
