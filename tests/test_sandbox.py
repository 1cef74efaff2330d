"""Hostile generated programs are contained, scored as failures, and the evaluator keeps working."""

import glob
import os
import tempfile
import time

import psutil
import pytest

from labhelpers import sandbox
from labhelpers.paths import REPO_ROOT

GOOD = "def f(x):\n    return x + 1\n"
TESTS = ["assert f(1) == 2"]

HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "fork_bomb_via_subprocess": "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])\n",
    "write_outside_tmp": "open('/tmp/sftlabs-pwned.txt', 'w').write('pwned')\n",
    "write_outside_via_os_open": "import os\nos.close(os.open('/tmp/sftlabs-pwned.txt', os.O_WRONLY | os.O_CREAT))\n",
    "socket": "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 22))\n",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill_everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
    "exit_zero_before_tests": "import sys\nsys.exit(0)\n",
    "os_exit_zero_before_tests": "import os\nos._exit(0)\n",
    "fake_success_output": "print('ok')\nraise SystemExit(0)\n",
    "huge_output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "deep_recursion": "def f(x):\n    return f(x)\nf(1)\n",
    "read_outside_tmp": "secret = open('/etc/passwd').read()\n",
    "read_parent_environment": "import os\nleak = open(f'/proc/{os.getppid()}/environ').read()\n",
    "read_the_course_repo": f"leak = open({str(REPO_ROOT / 'pyproject.toml')!r}).read()\n",
    "ctypes_segfault": "import ctypes\nctypes.string_at(0)\n",
    "c_stack_overflow": "import sys\nsys.setrecursionlimit(10**8)\ndef r(n):\n    return r(n + 1)\nr(0)\n",
    "abort": "import os\nos.abort()\n",
    "os_system": "import os\nos.system('touch /tmp/sftlabs-pwned.txt')\n",
    "signal_parent_term": "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)\n",
    "sleep_forever": "import time\ntime.sleep(3600)\n",
    "threads_that_never_end": "import threading\nfor _ in range(50):\n    threading.Thread(target=lambda: [0 for _ in iter(int, 1)]).start()\n",
    "too_many_files": "handles = [open(f'f{i}', 'w') for i in range(1000)]\n",
    "fill_the_disk": "open('big', 'wb').write(b'0' * 200 * 2**20)\n",
    "atexit_exit_zero": "import atexit, os\natexit.register(lambda: os._exit(0))\nraise RuntimeError('fail, then exit 0 at exit')\n",
    # tampering with the tests: an answer that equals everything, and theft of the harness's token
    "always_equal_answer": "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
                           "def f(x):\n    return Anything()\n",
    "steal_token_and_fake_results": "import __main__, os, sys\n"
                                    "sys.stdout.write('\\x00RESULT 0 2\\n' + __main__._token + '\\n'); sys.stdout.flush()\n"
                                    "os._exit(0)\n",
    "patch_builtins": "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
                      "def f(x):\n    return 0\n",
}


# expected values the programs never see (they are compared outside the sandbox)
HIDDEN_TESTS = ["assert f(41) == 42", "assert f(-1) == 0"]


def _program(name: str) -> str:
    """The hostile code, followed by a correct ``f`` unless the hostile code brings its own."""
    code = HOSTILE[name]
    return code if "def f(" in code else code + GOOD


@pytest.fixture
def leftovers():
    """Snapshot sandbox temp dirs and child processes; assert none are left after the test."""
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "sftlabs-sandbox-*")))
    yield
    time.sleep(0.2)
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "sftlabs-sandbox-*")))
    assert after <= before, f"left temp dirs behind: {after - before}"
    children = psutil.Process().children(recursive=True)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    if sandbox.isolation() and "setpriv" in sandbox.isolation():
        assert not [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == sandbox.NOBODY]


def test_good_program_passes(leftovers):
    result = sandbox.run_python(GOOD, TESTS)
    assert result.passed and not result.timed_out


def test_failing_assertion_fails(leftovers):
    assert not sandbox.run_python(GOOD, ["assert f(1) == 3"]).passed


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(name, leftovers):
    start = time.perf_counter()
    result = sandbox.run_python(_program(name), HIDDEN_TESTS, timeout_s=3, memory_mb=256)
    assert not result.passed
    assert time.perf_counter() - start < 10
    assert not os.path.exists("/tmp/sftlabs-pwned.txt")
    # the evaluator is alive and still scores correctly afterwards
    assert sandbox.run_python(GOOD, TESTS).passed


def test_environment_secrets_are_not_inherited(monkeypatch, leftovers):
    monkeypatch.setenv("SFTLABS_SECRET_TOKEN", "hunter2")
    result = sandbox.run_python("import os\nprint(sorted(os.environ.items()))\n" + GOOD, TESTS)
    assert result.passed and "hunter2" not in result.stdout and "SFTLABS_SECRET_TOKEN" not in result.stdout


def test_network_is_unreachable_even_without_the_audit_hook(leftovers):
    if not sandbox.isolation():
        pytest.skip("no namespace isolation on this machine; the audit hook alone blocks sockets")
    code = ("import sys\nsys.addaudithook = None\nimport _socket\n"
            "s = _socket.socket()\nok = s.connect_ex(('1.1.1.1', 80)) != 0\n" + GOOD)
    assert not sandbox.run_python(code, ["assert ok"]).passed  # blocked by the hook: socket.__new__


def test_batch_continues_past_hostile_programs(leftovers):
    codes = [GOOD, HOSTILE["infinite_loop"], GOOD, HOSTILE["fork_bomb"], HOSTILE["memory_bomb"], GOOD]
    verdicts = sandbox.run_tests_batch(codes, [TESTS] * len(codes), timeout_s=2)
    assert verdicts == [True, False, True, False, False, True]


def test_output_is_truncated(leftovers):
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


def test_the_whole_hostile_suite_in_one_batch(leftovers):
    """Every hostile program at once, two at a time: all fail, the good ones around them pass, and the
    time the suite takes is reported (and kept in build/sandbox-suite.json)."""
    import json

    from labhelpers.paths import build_dir

    names = sorted(HOSTILE)
    assert len(names) >= 20
    codes = [GOOD] + [_program(n) for n in names] + [GOOD]
    start = time.perf_counter()
    verdicts = sandbox.run_tests_batch(codes, [HIDDEN_TESTS] * len(codes), timeout_s=3)
    seconds = time.perf_counter() - start
    assert verdicts[0] and verdicts[-1], "good programs around the hostile ones still pass"
    assert not any(verdicts[1:-1]), [n for n, v in zip(names, verdicts[1:-1]) if v]
    assert not os.path.exists("/tmp/sftlabs-pwned.txt")
    report = {"programs": len(names), "seconds": round(seconds, 2), "isolation": " ".join(sandbox.isolation()) or "none"}
    build_dir().mkdir(parents=True, exist_ok=True)
    (build_dir() / "sandbox-suite.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"hostile suite: {len(names)} programs in {seconds:.1f} s")


def test_split_test_keeps_expected_values_outside():
    assert sandbox.split_test("assert f([1, 2]) == [2, 3]") == ("f([1, 2])", [2, 3])
    assert sandbox.split_test("assert f(1) == 2, 'message'") is None
    assert sandbox.split_test("assert f(1) > 2") is None
    assert sandbox.split_test("assert f(1) == g(2)") is None
    assert sandbox.split_test("print(1)") is None


def test_an_answer_of_the_wrong_value_fails_and_equal_values_pass():
    assert sandbox.run_python("def f(x):\n    return float(x + 1)\n", HIDDEN_TESTS).passed  # 42.0 == 42
    assert not sandbox.run_python("def f(x):\n    return str(x + 1)\n", HIDDEN_TESTS).passed
    # non-literal lines still run inside, as asserts
    assert sandbox.run_python(GOOD, ["assert f(1) > 1"]).passed
    assert not sandbox.run_python(GOOD, ["assert f(1) > 5"]).passed
