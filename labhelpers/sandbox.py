"""Run untrusted, model-written Python in a contained subprocess.

Layers of containment, each sufficient for some attacks and together for all the tests know:

1. **A fresh process** (``python -I -S``: no site-packages, no ``PYTHON*`` variables) in a new session,
   with a **clean environment** (no inherited secrets) and a **temporary working directory** that is
   deleted afterwards.
2. **Resource limits** (``setrlimit``): address space (memory bombs get ``MemoryError``), CPU seconds,
   file size (also caps stdout/stderr, which go to files), open files, number of processes.
3. **Namespaces** where the machine allows them (``unshare``): no network (``--net``), its own PID
   namespace (``--pid --kill-child``), so every process it forks dies with it; as root the code
   also runs as user ``nobody`` (``setpriv``), so it can write nowhere but its directory and
   cannot signal our processes. The chosen isolation is probed once and reported by :func:`isolation`.
4. **An audit hook** (PEP 578) installed before the code runs: process creation, signals, sockets,
   ``ctypes`` and writes outside the working directory raise ``PermissionError``.
5. **A wall-clock timeout**; on expiry the whole process group is killed.

6. **Answers are judged outside.** A test line ``assert <call> == <literal>`` is split: only the call
   goes into the sandbox, whose result comes back as a ``repr`` and is compared with the expected
   value by this process. The expected values never enter the sandbox, so nothing the program does
   in there (patching ``__eq__``, redefining builtins, walking frames to find the harness, printing
   fake results) can make a wrong answer pass. Other test lines run inside, as asserts.

A verdict is a pass only if the harness prints a per-run random token after the last test, so
``sys.exit(0)``/``os._exit(0)`` before the tests cannot pass.
"""

from __future__ import annotations

import ast
import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

NOBODY = 65534

HARNESS = r'''
import sys
_token = sys.stdin.readline().strip()
sys.stdin.close()
def _install_guard():
    import os, sysconfig
    root = os.path.realpath(os.getcwd())
    readable = (root, *{os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")})
    blocked = ("subprocess.", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
               "os.kill", "os.killpg", "signal.pthread_kill", "socket.", "ctypes.",
               "os.setuid", "os.chroot", "winreg.", "_posixsubprocess", "pty.", "resource.setrlimit")
    writes = ("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
              "os.link", "os.truncate", "os.utime", "shutil.", "os.unlink")
    def inside(path, roots):
        try:
            real = os.path.realpath(os.fsdecode(path))
        except Exception:
            return False
        return any(real == r or real.startswith(r + os.sep) for r in roots)
    def guard(event, args):
        if event.startswith(blocked):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args:
            path, mode, flags = (list(args) + [None, None])[:3]
            if not isinstance(path, (str, bytes, os.PathLike)):
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                      (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
            if writing and not inside(path, (root,)):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
            if not writing and not inside(path, readable):
                raise PermissionError(f"sandbox: reading {path!r} outside the working directory")
        if event.startswith(writes) and args and isinstance(args[0], (str, bytes, os.PathLike)) \
                and not inside(args[0], (root,)):
            raise PermissionError(f"sandbox: {event} outside the working directory")
    sys.addaudithook(guard)
_install_guard()
del _install_guard
_code = open("candidate.py").read()
_tests = open("tests.py").read().splitlines()
_calls = open("calls.py").read().splitlines()
_ns = {"__name__": "__candidate__"}
exec(compile(_code, "candidate.py", "exec"), _ns)
for _line in _tests:
    if _line.strip():
        exec(compile(_line, "tests.py", "exec"), _ns)
_results = []
for _call in _calls:
    _results.append(repr(eval(compile(_call, "calls.py", "eval"), _ns)))
sys.stdout.write("\n" + "".join(f"\x00RESULT {i} {r}\n" for i, r in enumerate(_results)) + _token + "\n")
sys.stdout.flush()
'''


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run. ``passed`` is the only field a scorer should trust."""

    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str


@functools.lru_cache(maxsize=1)
def isolation() -> tuple[str, ...]:
    """The command prefix that isolates a run, best available first (probed once per process)."""
    candidates = []
    if shutil.which("unshare"):
        if os.geteuid() == 0 and shutil.which("setpriv"):
            candidates.append(("unshare", "--net", "--pid", "--fork", "--kill-child", "setpriv",
                               f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"))
        candidates.append(("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"))
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, sys.executable, "-I", "-S", "-c", "pass"], capture_output=True,
                                   timeout=10, cwd=tempfile.gettempdir())
            if probe.returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return ()


def _limits(memory_mb: int, cpu_s: int, file_mb: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
    return apply


def split_test(line: str) -> tuple[str, object] | None:
    """``"assert f([1]) == 2"`` -> ``("f([1])", 2)``: the call to run inside and the expected value to
    compare outside; None for a line of another form (a literal is anything ``ast.literal_eval`` reads)."""
    try:
        tree = ast.parse(line.strip())
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert) or tree.body[0].msg is not None:
        return None
    test = tree.body[0].test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return None
    try:
        expected = ast.literal_eval(test.comparators[0])
    except ValueError:
        return None
    return ast.unparse(test.left), expected


def _results(stdout: bytes, token: str, n: int) -> list[object] | None:
    """The harness's results (``None`` if the harness did not finish): the block right before the token."""
    text = stdout.decode("utf-8", "replace").rstrip()
    if not text.endswith(token):
        return None
    lines = text[: -len(token)].rstrip("\n").split("\n")
    block = lines[len(lines) - n:] if n else []
    if len(block) != n:
        return None
    values = []
    for i, line in enumerate(block):
        prefix = f"\x00RESULT {i} "
        if not line.startswith(prefix):
            return None
        try:
            values.append(ast.literal_eval(line[len(prefix):]))
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            values.append(_NOT_A_LITERAL)
    return values


_NOT_A_LITERAL = object()


def run_python(code: str, tests: Sequence[str] = (), timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 64_000) -> SandboxResult:
    """Run ``code`` then ``tests`` in the sandbox.

    Lines ``assert <call> == <literal>`` are judged outside (see the module docstring); any other line
    runs inside as written. ``passed`` is True only when every test passed within the limits.
    Never raises for anything the code does; raises ValueError for a non-positive limit.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s} and {memory_mb}")
    workdir = Path(tempfile.mkdtemp(prefix="sftlabs-sandbox-"))
    logdir = Path(tempfile.mkdtemp(prefix="sftlabs-sandbox-log-"))
    token = secrets.token_hex(16)
    prefix = isolation()
    try:
        (workdir / "harness.py").write_text(HARNESS)
        (workdir / "candidate.py").write_text(code)
        split = [split_test(t) for t in tests]
        calls = [pair for pair in split if pair is not None]
        inside = [t for t, pair in zip(tests, split) if pair is None]
        (workdir / "tests.py").write_text("\n".join(inside) + "\n")
        (workdir / "calls.py").write_text("".join(call + "\n" for call, _ in calls))
        if prefix and "setpriv" in prefix:
            os.chown(workdir, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir)}
        with open(logdir / "out", "wb") as out, open(logdir / "err", "wb") as err:
            proc = subprocess.Popen([*prefix, sys.executable, "-I", "-S", "harness.py"], cwd=workdir, env=env,
                                    stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True,
                                    preexec_fn=_limits(memory_mb, int(timeout_s) + 1, 16), close_fds=True)
            timed_out = False
            try:
                proc.communicate((token + "\n").encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        raw = (logdir / "out").read_bytes()
        stdout = raw[:max_output_bytes].decode("utf-8", "replace")
        stderr = (logdir / "err").read_bytes()[:max_output_bytes].decode("utf-8", "replace")
        values = _results(raw, token, len(calls)) if not timed_out and proc.returncode == 0 else None
        passed = values is not None and all(v is not _NOT_A_LITERAL and v == e
                                            for v, (_, e) in zip(values, calls))
        return SandboxResult(passed, proc.returncode, timed_out, stdout, stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(logdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill everything the run started, leaving no process and no zombie behind.

    The descendants die first, so that ``unshare`` (when used) reaps its child, the PID namespace's
    init, whose death takes every other process of the namespace with it; then the whole process
    group gets SIGKILL for anything that escaped.
    """
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_tests_batch(codes: Sequence[str], tests: Sequence[Sequence[str]], workers: int = 2,
                    timeout_s: float = 5.0) -> list[bool]:
    """pass/fail of each (code, tests) pair; a hostile program fails alone and the batch goes on.

    Each distinct pair is judged once per process (:func:`verdict`): a completion that another model
    (or merge, or adapter) already wrote for the same row is not run again."""
    if len(codes) != len(tests):
        raise ValueError(f"got {len(codes)} programs but {len(tests)} test lists; pass one test list per program")
    pairs = [(code, tuple(row_tests)) for code, row_tests in zip(codes, tests)]
    distinct = list(dict.fromkeys(pairs))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        verdicts = dict(zip(distinct, pool.map(lambda pair: verdict(*pair, timeout_s=timeout_s), distinct)))
    return [verdicts[pair] for pair in pairs]


@functools.lru_cache(maxsize=16384)
def verdict(code: str, tests: tuple[str, ...], timeout_s: float = 5.0) -> bool:
    """Whether ``code`` passes ``tests`` in the sandbox (:func:`run_python`), remembered for this process.
    The harness is deterministic for a given program and test list, up to what the program itself makes
    random; a scorer counts such a program once either way."""
    return run_python(code, list(tests), timeout_s=timeout_s).passed
