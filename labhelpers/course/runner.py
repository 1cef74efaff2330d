"""Run lab notebooks headlessly with papermill: ``python -m labhelpers.course.runner --profile ci``.

Each ``solutions/<lab>/<lab>.ipynb`` is executed with ``PROFILE`` injected into its ``parameters``
cell, inside ``<out>/<lab>/``, and written to ``<out>/<lab>/<lab>.ipynb``; every figure it shows is
also saved as ``<out>/<lab>/figures/fig-NN.png``. After each lab, ``<out>/summary.md`` and
``<out>/report.html`` are rewritten with every lab finished so far, so a late failure loses nothing.
A lab that fails is reported (which cell, the error) and the next lab still runs; the exit status is
0 only when every lab passed. The kernel's own log goes to ``<out>/<lab>/kernel.log``, shown only
when a lab fails without a cell error (a kernel that died or hung says why only there).

A cell has no time limit unless ``--cell-timeout`` sets one: a lab must not fail because the machine is
slower than ours. The executed notebook is written after every cell (and every 30 s within a long one),
so a lab that fails, times out or is interrupted (Ctrl-C, SIGTERM) keeps every output up to the cell
that stopped it, and the failure names that cell.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import os
import platform
import re
import shutil
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

from labhelpers import tracking
from labhelpers.course import rehearsal
from labhelpers.course.lab_run import LabInterrupted, LabRun, failure_from, sigterm_interrupts
from labhelpers.paths import REPO_ROOT, build_dir
from labhelpers.profiles import get, is_rehearsal
from labhelpers.results import load_metrics, write_atomic

KERNEL = "sftlabs"


def discover(source: Path | None = None) -> list[Path]:
    """Every ``<source>/<lab>/<lab>.ipynb`` (source defaults to ``solutions/``), sorted by lab name."""
    source = source or REPO_ROOT / "solutions"
    return sorted(p for p in source.glob("*/*.ipynb") if p.stem == p.parent.name)


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send this process's standard error (file descriptor 2, which the kernel inherits) to ``path``.

    The kernel logs its start-up ("running over TCP without encryption") there; students see it only
    when a lab fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_lab(notebook: Path, out: Path, profile: str, kernel: str = KERNEL, timeout_s: int | None = None) -> LabRun:
    """Execute one notebook with papermill into ``out/<lab>/`` and return what it recorded.

    A cell error does not raise: it is returned in :attr:`LabRun.failure`, with the executed notebook
    (error included) and whatever metrics the lab saved before it. Metrics of an earlier run are
    removed first, so every number in the result comes from this run. ``timeout_s`` limits each cell
    (None: no limit). The notebook is saved after each cell, so a cell past its limit, a dead kernel or
    an interruption still leaves every output before it; an interruption (KeyboardInterrupt,
    :class:`Interrupted`) is recorded as the failure and then raised again, so no further lab runs."""
    import papermill

    lab = Path(notebook).stem
    out = Path(out).resolve()  # the kernel runs inside out/<lab>: a relative path would point elsewhere
    workdir = out / lab
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.json").unlink(missing_ok=True)
    executed = workdir / Path(notebook).name
    os.environ["SFTLABS_RESULTS"] = str(out)
    os.environ[tracking.LAB_ENV] = lab  # names this lab's tracked runs; those of an earlier run go
    for old in tracked_runs(lab, get(profile)):
        shutil.rmtree(old)
    backend = os.environ.pop("MPLBACKEND", None)  # the kernel must draw inline, so that figures are kept
    executed.unlink(missing_ok=True)  # an earlier run's notebook must not stand in for this one's
    failure, interrupted = None, None
    start = time.perf_counter()
    try:
        with stderr_to(workdir / "kernel.log"):
            papermill.execute_notebook(str(Path(notebook).resolve()), str(executed), parameters={"PROFILE": profile},
                                       kernel_name=kernel, cwd=str(workdir), progress_bar=False,
                                       execution_timeout=timeout_s, start_timeout=KERNEL_START_S,
                                       request_save_on_cell_execute=True)
    except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM: record where it stopped, then stop the run
        failure, interrupted = failure_from(error, executed), error
    except Exception as error:  # noqa: BLE001 - any failure of one lab is reported, and the next lab runs
        failure = failure_from(error, executed)
    finally:
        if backend is not None:
            os.environ["MPLBACKEND"] = backend
    seconds = time.perf_counter() - start
    if executed.exists():
        extract_figures(executed, workdir / "figures")
    try:
        metrics = load_metrics(lab, out)
    except FileNotFoundError:
        if failure is None:
            raise
        metrics = {}
    (workdir / "runtime.json").write_text(json.dumps({"seconds": seconds, "profile": profile,
                                                      "passed": failure is None}) + "\n")
    run = LabRun(lab, executed, seconds, metrics, failure)
    if interrupted is not None:
        raise LabInterrupted(run) from interrupted
    return run


KERNEL_START_S = 300  # a loaded machine can take minutes to start a kernel (papermill's default is 60 s)


def run_labs(out: Path, profile: str, source: Path | None = None, timeout_s: int | None = None) -> list[LabRun]:
    """Run every lab :func:`discover` finds, one after another, into ``out/<lab>/``: one progress line
    a lab, and ``summary.md`` and ``report.html`` rewritten as soon as each lab finishes. An interrupted
    lab is reported like a failed one, and the labs after it do not run (:class:`LabInterrupted` is
    raised again once the summary is written)."""
    out = Path(out).resolve()
    notebooks = discover(source)
    runs: list[LabRun] = []
    for i, notebook in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {notebook.stem} (profile {profile}) ...", end="", flush=True)
        interrupted = None
        try:
            run = run_lab(notebook, out, profile, timeout_s=timeout_s)
        except LabInterrupted as stop:
            run, interrupted = stop.run, stop
        runs.append(run)
        if run.passed:
            print(f" passed in {run.seconds:.0f} s", flush=True)
        else:
            print(f" FAILED after {run.seconds:.0f} s\n    {run.failure.describe()}\n"
                  f"    executed notebook: {run.notebook}", flush=True)
            log = out / run.lab / "kernel.log"  # a kernel that died or hung says why only there
            tail = log.read_text().strip().splitlines()[-20:] if log.exists() and not run.failure.traceback else []
            if tail:
                print("    kernel log (last lines):\n" + "\n".join(f"      {line}" for line in tail), flush=True)
        write_summary(runs, out, profile)
        write_report(runs, out, profile)
        if interrupted is not None:
            raise interrupted
    return runs


def tracked_runs(lab: str, profile) -> list[Path]:
    """The run folders the tracker holds for ``lab`` (none when tracking is off)."""
    root = tracking.tracking_root(profile)
    return sorted(root.glob(f"{lab}-*")) if root is not None and root.is_dir() else []


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


def _status(run: LabRun) -> str:
    return "passed" if run.passed else "FAILED"


def write_summary(runs: list[LabRun], out: Path, profile: str) -> Path:
    """``summary.md``: a table of every lab's status and run time, then one section per lab with
    where it failed (if it did) and every metric it recorded. ``out`` must be the resolved folder."""
    passed = sum(run.passed for run in runs)
    lines = [f"# SFT Labs results (profile `{profile}`)", "", f"{passed} of {len(runs)} labs passed.", "",
             f"Processor: {processor()} (run times depend on it: README, The labs).", "",
             "| lab | status | run time (s) |", "|---|---|---|",
             *[f"| {run.lab} | {_status(run)} | {run.seconds:.0f} |" for run in runs], ""]
    for run in runs:
        lines += [f"## {run.lab}", "", f"- status: {_status(run)}", f"- notebook: `{run.notebook.relative_to(out)}`",
                  f"- run time: {run.seconds:.0f} s"]
        if run.failure:
            lines += [f"- failed at {run.failure.describe()}"]
        runs_tracked = tracked_runs(run.lab, get(profile))
        if runs_tracked:
            lines += [f"- tracked training runs (TensorBoard): {len(runs_tracked)} in `{runs_tracked[0].parent}`"]
        claims = {k.removeprefix("claim_"): v for k, v in (run.metrics or {}).items() if k.startswith("claim_")}
        if claims:
            missed = [k for k, held in claims.items() if not held]
            lines += [f"- claims held: {len(claims) - len(missed)} of {len(claims)}"
                      + (f" (not held: {', '.join(missed)})" if missed else "")]
        if run.metrics:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in run.metrics.items()]
        else:
            lines += ["- no metrics were recorded"]
        lines.append("")
    path = out / "summary.md"
    write_atomic(path, "\n".join(lines))
    return path


REPORT_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "nbgrader")


# the CPU units that set how fast a CPU multiplies matrices in float32, bfloat16 and float16: on 2 cores the
# same `make test` took 35 minutes on a processor with AMX and AVX-512 FP16, 52 to 68 on earlier days (README)
MATRIX_UNITS = ("amx_bf16", "amx_fp16", "avx512_fp16", "avx512_bf16", "avx512f", "avx2")


def processor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU a run had, for reading its run times: its model, the cores this process may use, and
    which of :data:`MATRIX_UNITS` it has (``/proc/cpuinfo`` where the system has one, else the model
    name Python knows)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not cpuinfo.exists():
        return f"{platform.processor() or platform.machine()}, {cores} cores"
    text = cpuinfo.read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    units = [u for u in MATRIX_UNITS if flags and u in flags.group(1).split()]
    name = model.group(1).strip() if model else platform.machine()
    return f"{name}, {cores} cores, {' '.join(units) if units else 'none of ' + '/'.join(MATRIX_UNITS)}"


def environment() -> dict[str, str]:
    """Python, the processor and the versions of the packages the labs run on."""
    out = {"python": platform.python_version(), "machine": f"{platform.system()} {platform.machine()}",
           "processor": processor()}
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
    resolved = get(profile)
    env = environment()
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>SFT Labs results</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:12px;margin:.6em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%;border:1px solid #eee;margin:.4em 0}.meta td:first-child{font-weight:bold}"
             ".failed{color:#a00;font-weight:bold}pre.error{background:#fee;padding:.6em;overflow-x:auto;font-size:12px}",
             "</style></head><body>", f"<h1>SFT Labs results: profile <code>{html.escape(profile)}</code></h1>",
             "<table class='meta'>",
             f"<tr><td>profile</td><td>{html.escape(resolved.name)} (base model {html.escape(resolved.base_model)}, "
             f"device {resolved.device}, dtype {resolved.dtype})</td></tr>",
             f"<tr><td>seed</td><td>{resolved.seed}</td></tr>",
             *[f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in env.items()],
             f"<tr><td>total run time</td><td>{sum(r.seconds for r in runs):.0f} s</td></tr></table>",
             f"<h2>Contents</h2><p>{sum(r.passed for r in runs)} of {len(runs)} labs passed.</p><ul>",
             *[f"<li><a href='#{r.lab}'>{r.lab}</a> ({r.seconds:.0f} s){_status_html(r)}</li>" for r in runs],
             "</ul>"]
    for run in runs:
        rel = run.notebook.relative_to(out)
        figures = sorted((run.notebook.parent / "figures").glob("fig-*.png"))
        tables = notebook_tables(run.notebook) if run.notebook.exists() else []
        parts += [f"<h2 id='{run.lab}'>{run.lab}{_status_html(run)}</h2>",
                  f"<p>run time {run.seconds:.0f} s; executed notebook: <a href='{rel}'>{rel}</a></p>"]
        if run.failure:
            parts += [f"<p class='failed'>Failed at {html.escape(run.failure.describe())}</p>",
                      f"<pre class='error'>{html.escape(run.failure.traceback)}</pre>" if run.failure.traceback else ""]
        parts += ["<h3>Measured</h3><table>",
                  *[f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" if isinstance(v, float)
                    else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in run.metrics.items()],
                  "</table>", "<h3>Tables</h3>", *tables, "<h3>Figures</h3>",
                  *[f"<img src='{f.relative_to(out)}' alt='{run.lab} figure {i}'>" for i, f in enumerate(figures, 1)]]
    parts.append("</body></html>")
    path = out / "report.html"
    write_atomic(path, "\n".join(parts))
    return path


def _status_html(run: LabRun) -> str:
    return "" if run.passed else " <span class='failed'>FAILED</span>"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every lab notebook headlessly.")
    parser.add_argument("--profile", default="auto")
    parser.add_argument("--out", type=Path, default=build_dir())
    parser.add_argument("--source", type=Path, default=None)
    parser.add_argument("--cell-timeout", type=int, default=None, metavar="SECONDS",
                        help="fail a cell that runs longer than this (default: no limit, so a slow machine "
                             "only takes longer)")
    args = parser.parse_args(argv)

    resolved = get(args.profile)  # fails early, with the valid names, on a typo; "auto" is resolved here
    profile = resolved.name
    if is_rehearsal(resolved):  # the GPU profile's hub models are the offline stand-ins, built here
        os.environ.update(rehearsal.environment(rehearsal.build()))
    out = args.out.resolve()  # once, here: everything below gets the absolute folder
    os.environ.setdefault(tracking.TRACKING_ENV, str(out / "runs"))  # off in the ci and smoke profiles
    source = args.source.resolve() if args.source else None
    try:
        with sigterm_interrupts():
            runs = run_labs(out, profile, source, args.cell_timeout)
    except LabInterrupted as stop:
        print(f"interrupted in {stop.run.lab}: {stop}; its executed notebook (outputs up to there): "
              f"{stop.run.notebook}; summary: {out / 'summary.md'}", flush=True)
        return 130
    if not runs:
        print(f"no labs yet: nothing under {source or REPO_ROOT / 'solutions'} matches <lab>/<lab>.ipynb")
        return 0
    passed = sum(run.passed for run in runs)
    print(f"{passed} of {len(runs)} labs passed in {sum(run.seconds for run in runs):.0f} s; "
          f"summary: {out / 'summary.md'}, report: {out / 'report.html'}")
    tracked = [folder for run in runs for folder in tracked_runs(run.lab, resolved)]
    if tracked:
        print(f"{len(tracked)} training runs tracked in {tracked[0].parent}: "
              f"{Path(sys.executable).parent / 'tensorboard'} --logdir {tracked[0].parent}")
    return 0 if passed == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
