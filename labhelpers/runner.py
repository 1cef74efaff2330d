"""Run lab notebooks headlessly with papermill: ``python -m labhelpers.runner --profile ci``.

Each ``solutions/<lab>/<lab>.ipynb`` is executed with ``PROFILE`` injected into its ``parameters``
cell, inside ``<out>/<lab>/``, and written to ``<out>/<lab>/<lab>.ipynb``; every figure it shows is
also saved as ``<out>/<lab>/figures/fig-NN.png``.
Metrics the notebook saves (:mod:`labhelpers.results`) and the run time go into ``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from labhelpers.paths import REPO_ROOT, build_dir

KERNEL = "sftlabs"


@dataclass(frozen=True)
class LabRun:
    lab: str
    notebook: Path
    seconds: float
    metrics: dict


def discover(source: Path | None = None) -> list[Path]:
    """Every ``<source>/<lab>/<lab>.ipynb`` (source defaults to ``solutions/``), sorted by lab name."""
    source = source or REPO_ROOT / "solutions"
    return sorted(p for p in source.glob("*/*.ipynb") if p.stem == p.parent.name)


def run_lab(notebook: Path, out: Path, profile: str, kernel: str = KERNEL, timeout_s: int = 1800) -> LabRun:
    """Execute one notebook with papermill and return what it recorded. Raises on any cell error."""
    import papermill

    from labhelpers.results import load_metrics

    lab = notebook.stem
    out = Path(out).resolve()  # the kernel runs inside out/<lab>: a relative path would point elsewhere
    workdir = out / lab
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["SFTLABS_RESULTS"] = str(out)
    backend = os.environ.pop("MPLBACKEND", None)  # the kernel must draw inline, so that figures are kept
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(Path(notebook).resolve()), str(workdir / notebook.name),
                                   parameters={"PROFILE": profile}, kernel_name=kernel, cwd=str(workdir),
                                   progress_bar=False, execution_timeout=timeout_s, request_save_on_cell_execute=False)
    finally:
        if backend is not None:
            os.environ["MPLBACKEND"] = backend
    seconds = time.perf_counter() - start
    extract_figures(workdir / notebook.name, workdir / "figures")
    metrics = load_metrics(lab, out)
    (workdir / "runtime.json").write_text(json.dumps({"seconds": seconds, "profile": profile}) + "\n")
    return LabRun(lab, workdir / notebook.name, seconds, metrics)


def run_labs(out: Path, profile: str, source: Path | None = None) -> list[LabRun]:
    """Run every lab :func:`discover` finds, one after another, into ``out/<lab>/``, printing progress."""
    runs = []
    for notebook in discover(source):
        print(f"running {notebook.stem} (profile {profile}) ...", flush=True)
        runs.append(run_lab(notebook, out, profile))
        print(f"  done in {runs[-1].seconds:.0f} s", flush=True)
    return runs


def extract_figures(notebook: Path, folder: Path) -> list[Path]:
    """Write every PNG an executed notebook displays to ``folder/fig-NN.png`` (in cell order)."""
    import base64

    nb = json.loads(Path(notebook).read_text())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                path = folder / f"fig-{len(paths) + 1:02d}.png"
                path.write_bytes(base64.b64decode(png if isinstance(png, str) else "".join(png)))
                paths.append(path)
    return paths


def write_summary(runs: list[LabRun], out: Path, profile: str) -> Path:
    """``summary.md``: one section per lab with its run time and every metric it recorded."""
    lines = [f"# SFT Labs results (profile `{profile}`)", ""]
    for run in runs:
        lines += [f"## {run.lab}", "", f"- notebook: `{run.notebook.relative_to(out)}`",
                  f"- run time: {run.seconds:.0f} s", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in run.metrics.items()]
        lines.append("")
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


REPORT_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "nbgrader")


def environment() -> dict[str, str]:
    """Python and the versions of the packages the labs run on."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "machine": f"{platform.system()} {platform.machine()}"}
    for name in REPORT_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def notebook_tables(notebook: Path) -> list[str]:
    """The HTML of every table (DataFrame) an executed notebook displays, in cell order."""
    nb = json.loads(Path(notebook).read_text())
    tables = []
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            html = output.get("data", {}).get("text/html")
            html = "".join(html) if isinstance(html, list) else html
            if html and "<table" in html:
                tables.append(html)
    return tables


def write_report(runs: list[LabRun], out: Path, profile: str) -> Path:
    """``report.html``: for each lab its run time, executed notebook, tables and figures, metrics, and
    the profile, seed and package versions of the run (self-contained but for the figure files)."""
    import html

    from labhelpers.profiles import get

    resolved = get(profile)
    env = environment()
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>SFT Labs results</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:12px;margin:.6em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%;border:1px solid #eee;margin:.4em 0}.meta td:first-child{font-weight:bold}",
             "</style></head><body>", f"<h1>SFT Labs results: profile <code>{html.escape(profile)}</code></h1>",
             "<table class='meta'>",
             f"<tr><td>profile</td><td>{html.escape(resolved.name)} (base model {html.escape(resolved.base_model)}, "
             f"device {resolved.device}, dtype {resolved.dtype})</td></tr>",
             f"<tr><td>seed</td><td>{resolved.seed}</td></tr>",
             *[f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in env.items()],
             f"<tr><td>total run time</td><td>{sum(r.seconds for r in runs):.0f} s</td></tr></table>",
             "<h2>Contents</h2><ul>", *[f"<li><a href='#{r.lab}'>{r.lab}</a> ({r.seconds:.0f} s)</li>" for r in runs],
             "</ul>"]
    for run in runs:
        rel = run.notebook.relative_to(out)
        figures = sorted((run.notebook.parent / "figures").glob("fig-*.png"))
        parts += [f"<h2 id='{run.lab}'>{run.lab}</h2>",
                  f"<p>run time {run.seconds:.0f} s; executed notebook: <a href='{rel}'>{rel}</a></p>",
                  "<h3>Measured</h3><table>",
                  *[f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" if isinstance(v, float)
                    else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in run.metrics.items()],
                  "</table>", "<h3>Tables</h3>", *notebook_tables(run.notebook), "<h3>Figures</h3>",
                  *[f"<img src='{f.relative_to(out)}' alt='{run.lab} figure {i}'>" for i, f in enumerate(figures, 1)]]
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every lab notebook headlessly.")
    parser.add_argument("--profile", default="auto")
    parser.add_argument("--out", type=Path, default=build_dir())
    parser.add_argument("--source", type=Path, default=None)
    args = parser.parse_args(argv)
    from labhelpers.profiles import get

    get(args.profile)  # fail early, with the list of valid names, on a typo
    runs = run_labs(args.out, args.profile, args.source)
    if not runs:
        print(f"no labs yet: nothing under {args.source or REPO_ROOT / 'solutions'} matches <lab>/<lab>.ipynb")
        return 0
    print(f"summary: {write_summary(runs, args.out, args.profile)}")
    print(f"report: {write_report(runs, args.out, args.profile)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
