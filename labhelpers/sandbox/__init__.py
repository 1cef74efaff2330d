"""Run untrusted, model-written Python in a contained subprocess.

The boundary is the operating system's, not the interpreter's: code running in an interpreter can
always reach that interpreter's state, so nothing inside it (an audit hook, a secret token) is
trusted. Layers, outermost first:

1. **A supervisor process** (trusted code, outside the sandbox) owns the run: it becomes a *child
   subreaper* (``prctl``), so every process the program starts, even one that double-forks and calls
   ``setsid``, is re-parented to it; at the end of the run (exit or wall-clock timeout) it kills and
   reaps all of them. The evaluator then sweeps the supervisor's session as well.
2. **Namespaces and a private file system** (``bwrap``, bubblewrap, the sandbox Flatpak relies on),
   where the machine allows them: no network (the program sees only its own loopback), its own PID
   namespace (our processes do not exist for it; all of its processes die with the namespace), IPC
   and UTS namespaces, a new session (no terminal), and a mount namespace holding only the system
   directories and the Python installation **read-only**, the run's working directory read-write,
   and private, size-limited ``/tmp``, ``/var/tmp`` and ``/dev/shm``. The home directory, the course
   repository, ``/etc`` and every other path do not exist inside. As root the program runs as
   ``nobody`` (``setpriv``, with ``no_new_privs``); otherwise as your user id inside an unprivileged
   user namespace (shown as ``nobody``).
3. **Resource limits** (``setrlimit``): address space, CPU seconds, file size (also caps the output,
   which goes to files), open files, processes; no core dumps.
4. **An audit hook** (PEP 578) in the program's interpreter: process creation, signals, sockets,
   ``ctypes``, native modules, introspection of the harness and file-system changes outside the
   working directory raise ``PermissionError``. It turns the common mistakes into clear errors; it
   is not a security boundary (the program can reach it), which is why the layers above exist.
5. **A clean environment** (no inherited variables, so no tokens) and ``python -I -S``.

6. **Every test line is judged outside.** The parts of an ``assert`` that touch the program (a call,
   a name it defined) are evaluated inside and come back as literals (``repr`` read with
   :func:`ast.literal_eval`); the comparison, the expected values and the builtins it uses
   (``abs``, ``sorted``, ``math.isclose``...) run in the evaluator. Nothing the program does inside
   (patching ``__eq__`` or builtins, exiting early with ``0``, printing fake results) can make a
   wrong answer pass without the expected values, which never enter the sandbox. There is no secret
   to steal: a run passes only when every probed value came back and every assertion held.

:func:`isolation` reports the level a machine gets (``namespaces`` or ``process``); with
``process`` (no bubblewrap or no namespaces, e.g. macOS or a locked-down laptop) the program can
read and write what your user can, and reach the network, once it disables the audit hook. The
README's trust model states what each level stops.
"""

from __future__ import annotations

import ast
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from labhelpers.sandbox.containment import NOBODY, Containment, candidates, command, environment, without_namespaces
from labhelpers.sandbox.judge import SAFE_NAMES, TestLineError, TestPlan, judge, plan_tests, read_results
from labhelpers.sandbox.programs import HARNESS, SUPERVISOR

__all__ = ["NOBODY", "SAFE_NAMES", "Containment", "SandboxResult", "TestLineError", "TestPlan", "isolation",
           "plan_tests", "run_python", "run_tests_batch", "verdict", "without_namespaces"]


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run. ``passed`` is the only field a scorer should trust.
    ``leftover_processes``: processes of the run still alive when it ended, killed by the supervisor."""

    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    leftover_processes: int = 0


@functools.lru_cache(maxsize=1)
def isolation() -> Containment:
    """The best containment this machine gives, probed once per process with a real run at each level
    (:func:`~labhelpers.sandbox.containment.candidates`, best first): the program must start, write its
    working directory and find its own standard library."""
    probe = "import sys\nopen('probe', 'w').write('written')\nprefix = sys.prefix\n"
    check = f"assert prefix == {os.path.realpath(sys.base_prefix)!r}"
    levels = candidates()
    return next((level for level in levels if run_python(probe, [check], timeout_s=20, containment=level).passed),
                levels[-1])


def run_python(code: str, tests: Sequence[str] = (), timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 64_000, containment: Containment | None = None,
               audit_hook: bool = True) -> SandboxResult:
    """Run ``code`` then ``tests`` in the sandbox; ``passed`` is True only when every test passed within
    the limits.

    Each ``assert`` line is judged outside (see the module docstring). ``containment`` defaults to
    :func:`isolation`; ``containment`` and ``audit_hook=False`` exist to test each layer on its own.
    Never raises for anything the code does; raises ValueError for a non-positive limit and
    :class:`TestLineError` for a test line it cannot judge outside.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s} and {memory_mb}")
    plan = plan_tests(tests)
    containment = containment or isolation()
    workdir = Path(tempfile.mkdtemp(prefix="sftlabs-sandbox-"))
    logdir = Path(tempfile.mkdtemp(prefix="sftlabs-sandbox-log-"))
    try:
        (workdir / "harness.py").write_text(HARNESS)
        (workdir / "candidate.py").write_text(code)
        (workdir / "spec.py").write_text(repr({"hook": audit_hook, "steps": plan.steps}))
        if containment.user == "nobody" and os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)
        spec = {"argv": command(containment, workdir), "cwd": str(workdir), "env": environment(containment, workdir),
                "stdout": str(logdir / "out"), "stderr": str(logdir / "err"), "timeout_s": timeout_s,
                "limits": {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": int(timeout_s) + 1, "RLIMIT_FSIZE": 16 << 20,
                           "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0, "RLIMIT_NPROC": 64}}
        run = _run_in_namespaces if containment.level == "namespaces" else _run_supervised
        report = run(spec)
        report = report or {"returncode": None, "timed_out": True, "swept": 0}
        raw = (logdir / "out").read_bytes() if (logdir / "out").exists() else b""
        stderr = (logdir / "err").read_bytes() if (logdir / "err").exists() else b""
        finished = report["returncode"] == 0 and not report["timed_out"]
        values = read_results(raw, sum(kind == "probe" for kind, _ in plan.steps)) if finished else None
        passed = values is not None and judge(plan.checks, values)
        return SandboxResult(passed, report["returncode"], report["timed_out"],
                             raw[:max_output_bytes].decode("utf-8", "replace"),
                             stderr[:max_output_bytes].decode("utf-8", "replace"), report["swept"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(logdir, ignore_errors=True)


def _run_supervised(spec: dict) -> dict | None:
    """Run through the supervisor (see :data:`SUPERVISOR`): the subreaper that kills every process of
    the run at its end; then sweep the supervisor's session too where it could not become one."""
    supervisor = subprocess.Popen([sys.executable, "-I", "-S", "-c", SUPERVISOR, repr({**spec, "subreaper": True})],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                  start_new_session=True, close_fds=True)
    report = None
    try:
        report_text, _ = supervisor.communicate(timeout=spec["timeout_s"] + 10)
        report = ast.literal_eval(report_text.decode().strip() or "None")
    except (subprocess.TimeoutExpired, ValueError, SyntaxError):
        pass
    finally:
        if not (report and report["subreaper"]):  # the supervisor could not sweep it all
            _sweep_session(supervisor)
        supervisor.kill()
        supervisor.wait()
    return report


def _run_in_namespaces(spec: dict) -> dict:
    """Run bubblewrap directly: its PID namespace is the supervisor (every process of the run dies with
    it), ``--die-with-parent`` ties it to us, and a timeout kills it. The limits are set by ``prlimit``
    where it exists: a ``preexec_fn`` would make Python fork the whole evaluator (10 ms in a lab's kernel)."""
    prlimit = shutil.which("prlimit")
    argv, preexec = spec["argv"], None
    if prlimit:
        flags = [f"--{name.removeprefix('RLIMIT_').lower()}={value}" for name, value in spec["limits"].items()]
        argv = [prlimit, *flags, "--", *argv]
    else:
        def preexec() -> None:
            import resource

            for name, value in spec["limits"].items():
                resource.setrlimit(getattr(resource, name), (value, value))

    with open(spec["stdout"], "wb") as out, open(spec["stderr"], "wb") as err:
        proc = subprocess.Popen(argv, cwd=spec["cwd"], env=spec["env"], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, preexec_fn=preexec, start_new_session=True, close_fds=True)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        proc.kill()

    timer = threading.Timer(spec["timeout_s"], expire)  # a blocking wait returns the moment it exits
    timer.start()
    try:
        proc.wait()
    finally:
        timer.cancel()
    return {"returncode": proc.returncode, "timed_out": expired.is_set(), "swept": 0, "subreaper": False}


def _sweep_session(supervisor: subprocess.Popen) -> None:
    """Kill the supervisor if it is still there, and every process left in its session (a second line
    behind the supervisor's own sweep, for a machine without a subreaper)."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == supervisor.pid:
                proc.kill()
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError, psutil.AccessDenied):
            pass


def run_tests_batch(codes: Sequence[str], tests: Sequence[Sequence[str]], workers: int = 2,
                    timeout_s: float = 5.0) -> list[bool]:
    """pass/fail of each (code, tests) pair; a hostile program fails alone and the batch goes on.

    Each distinct pair is judged once per process (:func:`verdict`): a completion that another model
    (or merge, or adapter) already wrote for the same row is not run again."""
    if len(codes) != len(tests):
        raise ValueError(f"got {len(codes)} programs but {len(tests)} test lists; pass one test list per program")
    _say_if_reduced()
    pairs = [(code, tuple(row_tests)) for code, row_tests in zip(codes, tests)]
    distinct = list(dict.fromkeys(pairs))
    for _, row_tests in distinct:
        plan_tests(row_tests)  # a test line that cannot be judged outside fails here, before any run
    with ThreadPoolExecutor(max_workers=workers) as pool:
        verdicts = dict(zip(distinct, pool.map(lambda pair: verdict(*pair, timeout_s=timeout_s), distinct)))
    return [verdicts[pair] for pair in pairs]


@functools.lru_cache(maxsize=1)
def _say_if_reduced() -> None:
    """Warn once per process, in the evaluation's own output, when generated code runs with reduced containment."""
    level = isolation()
    if level.level != "namespaces":
        warnings.warn(level.describe(), RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=16384)
def verdict(code: str, tests: tuple[str, ...], timeout_s: float = 5.0) -> bool:
    """Whether ``code`` passes ``tests`` in the sandbox (:func:`run_python`), remembered for this process.
    The harness is deterministic for a given program and test list, up to what the program itself makes
    random; a scorer counts such a program once either way."""
    return run_python(code, list(tests), timeout_s=timeout_s).passed
