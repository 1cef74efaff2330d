"""The two programs a run starts, as source text: the harness, which runs inside the sandbox (the
candidate's code, the test lines' setup and probes, the optional audit hook), and the supervisor,
which runs outside it without namespaces (the child subreaper that kills every process of the run).
Both start with ``python -I -S`` and import little: json alone would cost 8 ms a run, so they read
the literals the evaluator writes with ``eval`` and no builtins."""

HARNESS = r'''
import sys
_inputs = sys.argv[1]
_spec = eval(open(_inputs + "/spec.py").read(), {"__builtins__": {}})  # a literal the evaluator wrote
_repr, _exec, _eval, _compile, _write = repr, exec, eval, compile, sys.stdout.write
if _spec["hook"]:
    def _install_guard():
        import os, sysconfig
        root = os.path.realpath(os.getcwd())
        readable = (root, os.path.realpath(_inputs),
                    *{os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")})
        blocked = ("subprocess.", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
                   "os.kill", "os.killpg", "signal.pthread_kill", "socket.", "ctypes.", "os.setuid", "os.chroot",
                   "winreg.", "_posixsubprocess", "pty.", "resource.setrlimit", "sys.addaudithook", "gc.get_",
                   "sys._current_frames", "sys.setprofile", "sys.settrace", "cpython.", "mmap.", "fcntl.ioctl")
        changes = ("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                   "os.link", "os.truncate", "os.utime", "shutil.", "os.unlink", "os.chflags", "os.setxattr",
                   "os.removexattr", "os.chdir")
        def inside(path, roots):
            try:
                real = os.path.realpath(os.fsdecode(path))
            except Exception:
                return False
            return any(real == r or real.startswith(r + os.sep) for r in roots)
        def is_path(value):
            return isinstance(value, (str, bytes, os.PathLike))
        def guard(event, args):
            if event.startswith(blocked):
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "open" and args:
                path, mode, flags = (list(args) + [None, None])[:3]
                if not is_path(path):
                    return
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                          (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
                if writing and not inside(path, (root,)):
                    raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
                if not writing and not inside(path, readable):
                    raise PermissionError(f"sandbox: reading {path!r} outside the working directory")
            if event.startswith(changes) and not all(inside(a, (root,)) for a in args if is_path(a)):
                raise PermissionError(f"sandbox: {event} outside the working directory")
        sys.addaudithook(guard)
    _install_guard()
    del _install_guard
_ns = {"__name__": "__candidate__"}
_code = open(_inputs + "/candidate.py").read()
_exec(_compile(_code, "candidate.py", "exec"), _ns)
_results = []
for _kind, _source in _spec["steps"]:
    if _kind == "run":
        _exec(_compile(_source, "tests.py", "exec"), _ns)
    else:
        _results.append(_repr(_eval(_compile(_source, "tests.py", "eval"), _ns)))
_write("\n" + "".join(f"\x00RESULT {i} {r}\n" for i, r in enumerate(_results)))
sys.stdout.flush()
'''

SUPERVISOR = r'''
import os, signal, sys, time
spec = eval(sys.argv[1], {"__builtins__": {}})  # a literal the evaluator wrote (json costs 8 ms to import)
subreaper = False
if spec["subreaper"]:  # every orphan of the run is re-parented to us (Linux; PR_SET_CHILD_SUBREAPER = 36)
    try:
        import ctypes
        subreaper = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except Exception:
        pass
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # wait for it with a timeout, without polling
def pause(seconds):
    if hasattr(signal, "sigtimedwait"):
        signal.sigtimedwait([signal.SIGCHLD], seconds)
    else:  # macOS: poll
        time.sleep(min(seconds, 0.005))
out = os.open(spec["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
err = os.open(spec["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
child = os.fork()
if child == 0:
    try:
        import resource
        os.setpgid(0, 0)
        for name, value in spec["limits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.closerange(3, 256)
        os.chdir(spec["cwd"])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    finally:
        os._exit(127)
os.close(out)
os.close(err)
returncode, timed_out = None, False
deadline = time.monotonic() + spec["timeout_s"]
while returncode is None:
    pid, status = os.waitpid(child, os.WNOHANG)
    if pid:
        returncode = os.waitstatus_to_exitcode(status)
        break
    left = deadline - time.monotonic()
    if left <= 0:
        timed_out = True
        break
    pause(min(left, 0.5))
def children():
    # Our children: (pid, alive) for each (a zombie has exited and only waits to be reaped)
    me, found = os.getpid(), []
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            pids = f.read().split()
    except OSError:
        pids = os.listdir("/proc") if os.path.isdir("/proc") else []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == me:
                found.append((int(pid), state != "Z"))
        except (OSError, IndexError, ValueError):
            pass
    return found
swept = set()
for target in ((child, -child) if timed_out else (-child,)):  # a reaped pid is not ours to kill
    try:
        os.kill(target, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
while True:  # kill and reap until no process of the run is left
    kids = children()
    for pid, alive in kids:
        if alive:
            swept.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        pid, status = os.waitpid(-1, 0 if kids else os.WNOHANG)
    except ChildProcessError:
        break
    if pid == 0:  # a child not yet seen (re-parented a moment ago): scan again
        pause(0.005)
        continue
    if pid == child:
        returncode = os.waitstatus_to_exitcode(status)
swept.discard(child)
print(repr({"returncode": returncode, "timed_out": timed_out, "swept": len(swept), "subreaper": subreaper}))
'''
