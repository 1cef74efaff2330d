"""Hostile generated programs, at every containment level: what each layer must stop on its own.

Levels (the sandbox's layers are described in ``labhelpers.sandbox``):

- ``full``: bubblewrap's namespaces and private file system, the supervisor, limits, the audit hook;
- ``no hook``: the same without the in-process audit hook: the operating system alone;
- ``no namespaces``: the supervisor, limits and the audit hook, as on a machine without bubblewrap;
- ``neither``: no namespaces and no hook: reported in the table, to show what is left.

Every program tries one way out. After each run the test looks for its effect outside: a file named
``sftlabs-escape-<program>`` in a directory the host shares, bytes at a server this test listens on
(loopback), a SIGUSR1 at this test's process, a secret in the output, a process still running, a
truncated file, or a wrong answer that passed.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psutil
import pytest

from labhelpers import sandbox
from labhelpers.paths import REPO_ROOT

GOOD = "def f(x):\n    return x + 1\n"
TESTS = ["assert f(1) == 2"]
HIDDEN_TESTS = ["assert f(41) == 42", "assert f(-1) == 0"]  # expected values the programs never see
ROOT = os.geteuid() == 0
SHARED_DIRS = [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), REPO_ROOT, Path.home()]
SECRET = "sftlabs-secret-4f1d"
SECRET_FILE = Path.home() / ".sftlabs-test-secret"
VICTIM = Path(tempfile.gettempdir()) / "sftlabs-victim"
MARK = "sftlabs-escape-"

# the test's own listening server and process, filled in by the fixtures below
WORLD: dict = {}
SECONDS: dict[tuple[str, str], float] = {}  # each (program, level) run's wall time


def _escape(name: str) -> str:
    return f"/tmp/{MARK}{name}"


def _programs() -> dict[str, str]:
    """name -> program. ``{PORT}``, ``{PID}`` and ``{NAME}`` are filled in per run."""
    leave = ("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
             "        os.execv('/bin/sleep', ['sftlabs-left-{NAME}', '30'])\n    os._exit(0)\n")
    return {
        # the file system: every kind of call that creates or changes a file outside
        "write_tmp": "open('/tmp/{MARK}{NAME}', 'w').write('x')\n",
        "write_dev_shm": "open('/dev/shm/{MARK}{NAME}', 'w').write('x')\n",
        "write_var_tmp": "open('/var/tmp/{MARK}{NAME}', 'w').write('x')\n",
        "write_home": f"open({str(Path.home())!r} + '/{{MARK}}{{NAME}}', 'w').write('x')\n",
        "write_course_repo": f"open({str(REPO_ROOT)!r} + '/{{MARK}}{{NAME}}', 'w').write('x')\n",
        "os_open_create": "import os\nos.close(os.open('/tmp/{MARK}{NAME}', os.O_WRONLY | os.O_CREAT))\n",
        "rename_out": "import os\nopen('x', 'w').write('x')\nos.rename('x', '/tmp/{MARK}{NAME}')\n",
        "replace_out": "import os\nopen('x', 'w').write('x')\nos.replace('x', '/tmp/{MARK}{NAME}')\n",
        "hard_link_out": "import os\nopen('x', 'w').write('x')\nos.link('x', '/tmp/{MARK}{NAME}')\n",
        "symlink_out": "import os\nos.symlink('/etc/passwd', '/tmp/{MARK}{NAME}')\n",
        "mkdir_out": "import os\nos.mkdir('/tmp/{MARK}{NAME}')\n",
        "mkfifo_out": "import os\nos.mkfifo('/tmp/{MARK}{NAME}')\n",
        "copy_out": "import shutil\nopen('x', 'w').write('x')\nshutil.copy('x', '/tmp/{MARK}{NAME}')\n",
        "pathlib_out": "import pathlib\npathlib.Path('/tmp/{MARK}{NAME}').write_text('x')\n",
        "truncate_victim": f"import os\nos.truncate({str(VICTIM)!r}, 0)\n",
        "chmod_victim": f"import os\nos.chmod({str(VICTIM)!r}, 0o777)\n",
        "fill_tmp": "f = open('/tmp/{MARK}{NAME}', 'wb')\nfor _ in range(200):\n    f.write(b'0' * 2**20)\n",
        "fill_the_working_directory": "for i in range(20):\n    open(f'big{i}', 'wb').write(b'0' * 16 * 2**20)\n",
        # processes: at every level, and leaving one behind
        "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
        "subprocess_bomb": "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])\n",
        "daemon_double_fork": leave,
        "os_system_daemon": "import os\nos.system('(exec -a sftlabs-left-{NAME} sleep 30) >/dev/null 2>&1 &')\n",
        "posix_spawn_daemon": "import os\nos.posix_spawn('/bin/sleep', ['sftlabs-left-{NAME}', '30'], {}, setsid=True)\n",
        "threads_that_never_end": "import threading\nfor _ in range(8):\n"
                                  "    threading.Thread(target=lambda: [0 for _ in iter(int, 1)]).start()\n",
        # signals at the real processes: this test's, and the sandbox's own parent
        "signal_the_test": "import os, signal\nos.kill({PID}, signal.SIGUSR1)\n",
        "signal_the_test_group": "import os, signal\nos.killpg(os.getpgid({PID}), signal.SIGUSR1)\n",
        "kill_own_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "kill_everything": "import os, signal\nos.kill(-1, signal.SIGUSR1)\n",
        # the network: a server this test listens on, on loopback
        "connect_to_loopback": "import socket\ns = socket.create_connection(('127.0.0.1', {PORT}), timeout=1)\n"
                               "s.sendall(b'{NAME}')\ns.close()\n",
        "raw_socket_module": "import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {PORT}))\n"
                             "s.send(b'{NAME}')\n",
        # native code
        "ctypes_libc_system": "import ctypes\nctypes.CDLL('libc.so.6').system(b'touch /tmp/{MARK}{NAME}')\n",
        "ctypes_segfault": "import ctypes\nctypes.string_at(0)\n",
        # secrets: a file only this test's user may read, this process's environment, the course's files
        "read_secret_file": f"print(open({str(SECRET_FILE)!r}).read())\n",
        "read_test_environment": "print(open('/proc/{PID}/environ').read())\n",
        "read_the_course_repo": f"print(open({str(REPO_ROOT / 'pyproject.toml')!r}).read())\n",
        "list_home_directory": f"import os\nprint(os.listdir({str(Path.home())!r}))\n",
        # limits
        "infinite_loop": "while True:\n    pass\n",
        "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n",
        "huge_output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
        "deep_recursion": "def g(x):\n    return g(x)\ng(1)\n",
        "c_stack_overflow": "import sys\nsys.setrecursionlimit(10**8)\ndef r(n):\n    return r(n + 1)\nr(0)\n",
        "abort": "import os\nos.abort()\n",
        "sleep_forever": "import time\ntime.sleep(3600)\n",
        "too_many_files": "handles = [open(f'f{i}', 'w') for i in range(1000)]\n",
        # the verdict: wrong answers that try to pass
        "exit_zero_before_tests": "import sys\nsys.exit(0)\n",
        "os_exit_zero_before_tests": "import os\nos._exit(0)\n",
        "atexit_exit_zero": "import atexit, os\natexit.register(lambda: os._exit(0))\nraise RuntimeError('fail')\n",
        "always_equal_answer": "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
                               "def f(x):\n    return Anything()\n",
        "fake_results_block": "import os, sys\nsys.stdout.write('\\n\\x00RESULT 0 1\\n\\x00RESULT 1 1\\n')\nsys.stdout.flush()\n"
                              "os._exit(0)\n",
        "patch_builtins": "import builtins\nbuiltins.repr = lambda value: '42'\nbuiltins.AssertionError = Exception\n"
                          "def f(x):\n    return 0\n",
        "read_the_harness_spec": "import json, os, sys\nspec = json.load(open(sys.argv[1] + '/spec.json'))\n"
                                 "def f(x):\n    return spec\n",
    }


PROGRAMS = _programs()
CHEATS = {"exit_zero_before_tests", "os_exit_zero_before_tests", "atexit_exit_zero", "always_equal_answer",
          "fake_results_block", "patch_builtins", "read_the_harness_spec"}
LEVELS = ("full", "no hook", "no namespaces", "neither")
# what the audit hook alone cannot stop, and why (checked: these escape at "no namespaces" too)
HOOK_GAPS = {"mkfifo_out": "os.mkfifo raises no audit event"}
# programs too dangerous to let loose without either layer (they would hit the machine's own processes)
NOT_WITHOUT_LAYERS = {"kill_everything", "fork_bomb", "subprocess_bomb"} if not ROOT else set()


def _containment(level: str) -> tuple[sandbox.Containment, bool]:
    if level in ("full", "no hook"):
        return sandbox.isolation(), level == "full"
    return sandbox.without_namespaces("no namespaces (test)"), level == "no namespaces"


def _has_namespaces() -> bool:
    """Whether this machine gives namespaces; CI must at least have bubblewrap (`make setup` installs it)."""
    if sandbox.isolation().level == "namespaces":
        return True
    if os.environ.get("CI") and not shutil.which("bwrap"):
        pytest.fail(f"CI must run the sandbox with bubblewrap; this machine got {sandbox.isolation()}: "
                    "`make setup` installs it")
    return False


@pytest.fixture(scope="module", autouse=True)
def world():
    """A loopback server, a SIGUSR1 counter, a secret file and a victim file, for the programs to reach."""
    received: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.settimeout(1)
            try:
                received.append(conn.recv(1024) or b"<connected>")
            except OSError:
                received.append(b"<connected>")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    signals: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: signals.append(1))
    SECRET_FILE.write_text(SECRET)
    SECRET_FILE.chmod(0o600)
    os.environ["SFTLABS_TEST_SECRET"] = SECRET
    WORLD.update(port=server.getsockname()[1], received=received, signals=signals)
    yield WORLD
    stop.set()
    thread.join()
    server.close()
    signal.signal(signal.SIGUSR1, previous)
    SECRET_FILE.unlink(missing_ok=True)
    VICTIM.unlink(missing_ok=True)
    os.environ.pop("SFTLABS_TEST_SECRET", None)


def _left_processes(grace_s: float = 3.0) -> list[str]:
    """Processes of a run still alive, after giving the ones the kernel is tearing down ``grace_s`` to go:
    a process killed a moment ago (its PID namespace ended with bubblewrap) can still be listed, with an
    empty command line, for a few milliseconds after the run returned (it failed CI once that way)."""
    deadline = time.monotonic() + grace_s
    while True:
        found = _alive_processes_of_runs()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _alive_processes_of_runs() -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "uids", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "sftlabs-left-" in cmdline or (ROOT and proc.info["uids"] and proc.info["uids"].real == sandbox.NOBODY):
            found.append(f"{proc.info['pid']} {proc.info['status']} {cmdline[:60]}")
    mine = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                mine.append(f"{child.pid} {child.status()} {' '.join(child.cmdline())[:60]}")
        except psutil.NoSuchProcess:
            pass
    return found + mine


def _escaped_files() -> list[str]:
    return sorted(str(p) for d in SHARED_DIRS if d.is_dir() for p in d.glob(MARK + "*"))


def _shared_entries() -> set[str]:
    """Everything at the top of the directories every user may write (what a run could leave there)."""
    return {str(p) for d in SHARED_DIRS[:3] if d.is_dir() for p in d.iterdir()}


def _clean_up() -> None:
    for path in _escaped_files():
        p = Path(path)
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        else:
            p.unlink()
    for proc in psutil.process_iter(["cmdline"]):
        if "sftlabs-left-" in " ".join(proc.info["cmdline"] or []):
            proc.kill()


@functools.lru_cache(maxsize=None)
def outcome(name: str, level: str) -> tuple[str, ...]:
    """Run one program at one level; return how it got out (empty: contained)."""
    containment, hook = _containment(level)
    VICTIM.write_text("victim")
    VICTIM.chmod(0o666)
    received, signals = len(WORLD["received"]), len(WORLD["signals"])
    before = _shared_entries()
    code = (PROGRAMS[name].replace("{PORT}", str(WORLD["port"])).replace("{PID}", str(os.getpid()))
            .replace("{MARK}", MARK).replace("{NAME}", name))
    code = code if "def f(" in code else code + GOOD
    start = time.perf_counter()
    result = sandbox.run_python(code, HIDDEN_TESTS, timeout_s=2, memory_mb=256, containment=containment,
                                audit_hook=hook)
    seconds = SECONDS[name, level] = time.perf_counter() - start
    time.sleep(0.05)
    ways = []
    if name in CHEATS and result.passed:
        ways.append("a wrong answer passed")
    ways += [f"file {path}" for path in _escaped_files()]
    ways += [f"new entry {path}" for path in sorted(_shared_entries() - before)
             if not path.startswith(tuple(f"{d}/{MARK}" for d in SHARED_DIRS[:3]))]  # (named above)
    if VICTIM.read_text() != "victim":
        ways.append("truncated a file outside")
    if VICTIM.stat().st_mode & 0o777 != 0o666:
        ways.append("changed a file's mode outside")
    ways += [f"network: the server got {data!r}" for data in WORLD["received"][received:]]
    if len(WORLD["signals"]) > signals:
        ways.append("signalled the test's process")
    if SECRET in result.stdout + result.stderr:
        ways.append("printed a secret")
    if "[project]" in result.stdout:
        ways.append("read the course repository")
    if ".sftlabs-test-secret" in result.stdout:
        ways.append("listed the home directory")
    ways += [f"process left: {p}" for p in _left_processes()]
    if seconds > 10:
        ways.append(f"the run took {seconds:.0f} s")
    _clean_up()
    return tuple(ways)


def _names_for(level: str) -> list[str]:
    return sorted(n for n in PROGRAMS if not (level == "neither" and n in NOT_WITHOUT_LAYERS))


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_full_containment_stops_every_program(name):
    if not _has_namespaces():
        pytest.skip(f"no namespaces on this machine ({sandbox.isolation().tool})")
    assert outcome(name, "full") == ()
    assert sandbox.run_python(GOOD, TESTS).passed  # the evaluator still scores correctly afterwards


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_the_operating_system_contains_every_program_without_the_audit_hook(name):
    if not _has_namespaces():
        pytest.skip(f"no namespaces on this machine ({sandbox.isolation().tool})")
    assert outcome(name, "no hook") == ()


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_without_namespaces_the_hook_supervisor_and_limits_still_contain(name):
    ways = outcome(name, "no namespaces")
    if name in HOOK_GAPS:
        assert ways, f"{name} is listed as a gap of the hook ({HOOK_GAPS[name]}) but was contained: update HOOK_GAPS"
    else:
        assert ways == ()


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_with_neither_layer_no_process_is_left_and_no_wrong_answer_passes(name):
    """What the supervisor and the outside judge guarantee on their own, on any machine."""
    if name in NOT_WITHOUT_LAYERS:
        pytest.skip("would signal or flood this user's own processes without a namespace or the hook")
    ways = outcome(name, "neither")
    assert not [w for w in ways if w.startswith(("process left", "a wrong answer", "the run took"))]


def test_the_containment_table():
    """Every program at every level, written to build/sandbox-suite.json and .md (the README's trust
    model summarizes it): at the full level, nothing escapes, no file and no process is left."""
    from labhelpers.paths import build_dir

    levels = [lv for lv in LEVELS if lv not in ("full", "no hook") or sandbox.isolation().level == "namespaces"]
    table = {name: {lv: list(outcome(name, lv)) if name in _names_for(lv) else None for lv in levels}
             for name in sorted(PROGRAMS)}
    seconds = {lv: round(sum(t for (_, level), t in SECONDS.items() if level == lv), 1) for lv in levels}
    lines = ["| program | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
    for name, row in table.items():
        cells = ["not run" if ways is None else ("contained" if not ways else "; ".join(ways)) for ways in row.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    escaped = {lv: sum(bool(row[lv]) for row in table.values() if row[lv] is not None) for lv in levels}
    report = {"programs": len(table), "isolation": sandbox.isolation().describe(), "escaped_per_level": escaped,
              "seconds_per_level": seconds, "table": table}
    build_dir().mkdir(parents=True, exist_ok=True)
    (build_dir() / "sandbox-suite.json").write_text(json.dumps(report, indent=2) + "\n")
    (build_dir() / "sandbox-suite.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if "full" in levels:
        assert escaped["full"] == 0 and escaped["no hook"] == 0
    assert not _escaped_files() and not _left_processes()


def test_good_program_passes_and_wrong_answers_fail():
    result = sandbox.run_python(GOOD, TESTS)
    assert result.passed and not result.timed_out and result.leftover_processes == 0
    assert not sandbox.run_python(GOOD, ["assert f(1) == 3"]).passed
    assert sandbox.run_python("def f(x):\n    return float(x + 1)\n", HIDDEN_TESTS).passed  # 42.0 == 42
    assert not sandbox.run_python("def f(x):\n    return str(x + 1)\n", HIDDEN_TESTS).passed


def test_every_form_of_assertion_is_judged_outside():
    plan = sandbox.plan_tests(["assert f([1, 2]) == [2, 3]", "assert abs(f(0.5) - 1.5) < 1e-9, 'close'",
                               "y = f(2)", "assert sorted([y, f(0)]) == [1, 3]", "assert math.isclose(f(1), 2)",
                               "assert f(1) in (2, 3) and not f(2) == 4"])
    assert plan.steps == (("probe", "f([1, 2])"), ("probe", "f(0.5)"), ("run", "y = f(2)"), ("probe", "y"),
                          ("probe", "f(0)"), ("probe", "f(1)"), ("probe", "f(1)"), ("probe", "f(2)"))
    assert plan.checks == ("_v0 == [2, 3]", "abs(_v1 - 1.5) < 1e-09", "sorted([_v2, _v3]) == [1, 3]",
                           "math.isclose(_v4, 2)", "_v5 in (2, 3) and (not _v6 == 4)")
    numbers = "def f(x):\n    return [v + 1 for v in x] if isinstance(x, list) else x + 1\n"
    assert sandbox.run_python(numbers, ["assert f(1) > 1", "assert abs(f(0.5) - 1.5) < 1e-9"]).passed
    assert not sandbox.run_python(numbers, ["assert f(1) > 5"]).passed
    # an object that equals everything never leaves the sandbox as a value: its repr is not a literal
    anything = "class A:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\ndef f(x):\n    return A()\n"
    assert not sandbox.run_python(anything, ["assert f(1) == 2"]).passed
    assert not sandbox.run_python(anything, ["assert f(1) > 1"]).passed


@pytest.mark.parametrize("line, problem", [
    ("for i in range(3): assert f(i) == i + 1", "its for statement"),
    ("assert all(f(i) == i + 1 for i in range(3))", "comprehension"),
    ("if True: assert f(1) == 2", "its if statement"),
    ("assert f(1 ==", "not valid Python"),
])
def test_a_test_line_that_cannot_be_judged_outside_is_refused_with_the_fix(line, problem):
    with pytest.raises(sandbox.TestLineError, match=problem) as error:
        sandbox.run_python(GOOD, [line])
    assert line in str(error.value)
    with pytest.raises(sandbox.TestLineError):
        sandbox.run_tests_batch([GOOD], [[line]])


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("SFTLABS_SECRET_TOKEN", "hunter2")
    result = sandbox.run_python("import os\nprint(sorted(os.environ.items()))\n" + GOOD, TESTS)
    assert result.passed and "hunter2" not in result.stdout and "SFTLABS_SECRET_TOKEN" not in result.stdout


def test_a_process_left_behind_is_killed_by_the_supervisor_at_every_level():
    code = PROGRAMS["daemon_double_fork"].replace("{NAME}", "supervisor-check") + GOOD
    for level in LEVELS:
        containment, hook = _containment(level)
        result = sandbox.run_python(code, TESTS, containment=containment, audit_hook=False)
        assert not _left_processes(), level
        if containment.level == "process":
            assert result.passed and result.leftover_processes >= 1, level  # it ran, and was swept


def test_reduced_containment_is_stated_once_in_the_evaluation_output(monkeypatch):
    reduced = sandbox.Containment("process", "your user", "no bubblewrap (`bwrap`)")
    monkeypatch.setattr(sandbox, "isolation", lambda: reduced)
    sandbox._say_if_reduced.cache_clear()
    with pytest.warns(RuntimeWarning, match="REDUCED containment"):
        sandbox.run_tests_batch([GOOD], [TESTS])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sandbox.run_tests_batch([GOOD], [TESTS])  # once per process
    sandbox._say_if_reduced.cache_clear()


def test_isolation_is_reported_in_words():
    level = sandbox.isolation()
    assert level.level in ("namespaces", "process") and level.describe()
    reduced = sandbox.Containment("process", "your user", "no bubblewrap (`bwrap`)").describe()
    assert reduced.startswith("REDUCED containment") and "bubblewrap" in reduced


def test_batch_continues_past_hostile_programs():
    codes = [GOOD, PROGRAMS["infinite_loop"], GOOD, PROGRAMS["fork_bomb"], PROGRAMS["memory_bomb"], GOOD]
    verdicts = sandbox.run_tests_batch(codes, [TESTS] * len(codes), timeout_s=2)
    assert verdicts == [True, False, True, False, False, True]


def test_output_is_truncated():
    result = sandbox.run_python("print('y' * 10**6)\n" + GOOD, TESTS, max_output_bytes=1000)
    assert len(result.stdout) <= 1000


def test_each_distinct_program_and_test_list_runs_once(monkeypatch):
    runs = []
    real = sandbox.run_python
    monkeypatch.setattr(sandbox, "run_python", lambda code, tests, **kw: runs.append(code) or real(code, tests, **kw))
    sandbox.verdict.cache_clear()
    wrong = "def f(x):\n    return x\n"
    assert sandbox.run_tests_batch([GOOD, wrong, GOOD], [TESTS] * 3) == [True, False, True]
    assert sandbox.run_tests_batch([wrong, GOOD], [TESTS, TESTS]) == [False, True]
    assert sorted(runs) == sorted([GOOD, wrong])  # three programs, then two more: two runs
    assert sandbox.run_tests_batch([GOOD], [["assert f(2) == 3"]]) == [True]  # another test list: judged again
    assert len(runs) == 3
    sandbox.verdict.cache_clear()


def test_bad_limits_and_mismatched_batch_raise():
    with pytest.raises(ValueError, match="positive"):
        sandbox.run_python(GOOD, TESTS, timeout_s=0)
    with pytest.raises(ValueError, match="one test list per program"):
        sandbox.run_tests_batch([GOOD, GOOD], [TESTS])
