"""Hostile generated programs are contained, scored as failures, and the evaluator keeps working."""

import glob
import os
import tempfile
import time

import psutil
import pytest

from labhelpers import sandbox

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
}


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
    result = sandbox.run_python(HOSTILE[name] + GOOD, TESTS, timeout_s=3, memory_mb=256)
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


def test_bad_limits_and_mismatched_batch_raise():
    with pytest.raises(ValueError, match="positive"):
        sandbox.run_python(GOOD, TESTS, timeout_s=0)
    with pytest.raises(ValueError, match="one test list per program"):
        sandbox.run_tests_batch([GOOD, GOOD], [TESTS])
