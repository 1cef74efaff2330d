"""The containment levels a machine can give generated code (:func:`candidates`, probed once by
:func:`labhelpers.sandbox.isolation`), and the command of a run at each: bubblewrap's namespaces and private file system, or a plain process (as
``nobody`` when we are root)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
TMPFS_BYTES = 32 << 20  # each private /tmp, /var/tmp and /dev/shm
WORK_BYTES = 64 << 20   # the private working directory (namespaces: nothing the program writes reaches the disk)
INPUTS, WORK = "/sandbox/inputs", "/sandbox/work"  # where the run's files and working directory appear inside


@dataclass(frozen=True)
class Containment:
    """The containment a machine gives generated code (:func:`isolation`).

    ``level``: ``"namespaces"`` (bubblewrap: private read-only file system, no network, own PID
    namespace) or ``"process"`` (resource limits, the supervisor's sweep and the audit hook only).
    ``user``: who the program runs as. ``tool``: what provides the namespaces, if anything."""

    level: str
    user: str
    tool: str

    def describe(self) -> str:
        if self.level == "namespaces":
            return (f"generated code runs contained by the operating system ({self.tool}): no network, its own "
                    f"processes only, a read-only system and a private working directory, as {self.user}")
        return (f"REDUCED containment: {self.tool}; generated code runs as {self.user} with resource limits and every "
                "process killed at the end, but once it disables the in-process audit hook it can read and write "
                "what that user can and reach the network. Install bubblewrap (`bwrap`) for full containment.")


def _system_mounts() -> list[str]:
    """bwrap arguments for the system directories (read-only; merged-/usr symlinks kept as links)."""
    args: list[str] = []
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _bind(path: str, made: set[str], mode: str = "--ro-bind") -> list[str]:
    """bwrap arguments that mount ``path`` at the same place, first creating the parents not in ``made``
    (mode 0755, so that ``nobody`` can reach it even when a parent, like /root, is private outside)."""
    args: list[str] = []
    for parent in map(str, reversed(Path(path).parents)):
        if parent not in made:
            args += ["--perms", "0755", "--dir", parent] if "--perms" in _bwrap_options() else ["--dir", parent]
            made.add(parent)
    made.add(path)
    return args + [mode, path, path]


def _interpreter() -> tuple[str, list[str]]:
    """The real interpreter to run (not a virtual environment's link: ``-I -S`` uses no site-packages)
    and the folders it needs, beyond the system directories."""
    exe = os.path.realpath(sys.executable)
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, str(Path(exe).parent.parent))}
    system = ("/usr/", "/bin/", "/lib")
    return exe, sorted(p for p in prefixes if not (p + "/").startswith(system))


@functools.lru_cache(maxsize=1)
def _bwrap_options() -> frozenset[str]:
    """The options this bubblewrap knows (``--size`` and ``--perms`` came in 0.5-0.6, ``--disable-userns``
    in 0.8): an older one still contains, with what it has."""
    try:
        text = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(word for word in text.split() if word.startswith("--"))


def _sized_tmpfs(path: str, size: int, perms: str) -> list[str]:
    known = _bwrap_options()
    return ((["--perms", perms] if "--perms" in known else []) + (["--size", str(size)] if "--size" in known else [])
            + ["--tmpfs", path])


def _bwrap_argv(workdir: Path, as_root: bool) -> list[str]:
    exe, prefixes = _interpreter()
    args = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session"]
    if not as_root:  # an unprivileged user namespace; your id is shown as nobody inside
        args += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
        args += ["--disable-userns"] if "--disable-userns" in _bwrap_options() else []
    args += _system_mounts()
    made = {"/", "/usr", "/proc", "/dev", "/var", "/tmp", "/var/tmp", "/dev/shm"}
    for prefix in prefixes:
        args += _bind(prefix, made)
    args += ["--proc", "/proc", "--dev", "/dev"]
    for tmp in ("/tmp", "/var/tmp", "/dev/shm"):
        args += _sized_tmpfs(tmp, TMPFS_BYTES, "01777")
    args += ["--dir", "/sandbox", "--ro-bind", str(workdir), INPUTS, *_sized_tmpfs(WORK, WORK_BYTES, "01777"),
             "--chdir", WORK, "--"]
    if as_root:
        args += ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs", "--"]
    return args + [exe, "-I", "-S", f"{INPUTS}/harness.py", INPUTS]


def _process_argv(as_nobody: bool) -> list[str]:
    exe, _ = _interpreter()
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs", "--"]
    return (drop if as_nobody else []) + [exe, "-I", "-S", "harness.py", "."]


def command(containment: Containment, workdir: Path) -> list[str]:
    """The command of a run at this level, its program as an absolute path (the supervisor calls execve)."""
    as_root = os.geteuid() == 0
    if containment.level == "namespaces":
        argv = _bwrap_argv(workdir, as_root)
    else:
        argv = _process_argv(as_root and containment.user == "nobody")
    return [shutil.which(argv[0]) or argv[0], *argv[1:]]


def without_namespaces(reason: str) -> Containment:
    """The process level: as ``nobody`` when we are root (``setpriv``), else as your user; ``reason``
    says why there are no namespaces."""
    as_nobody = os.geteuid() == 0 and shutil.which("setpriv") is not None
    return Containment("process", "nobody" if as_nobody else "your user", reason)


def candidates() -> list[Containment]:
    """Every level this machine might give, best first; :func:`labhelpers.sandbox.isolation` probes them."""
    as_root = os.geteuid() == 0
    if not shutil.which("bwrap"):
        levels = [without_namespaces("no bubblewrap (`bwrap`)")]
    else:
        levels = [Containment("namespaces", "nobody" if as_root else "your user id (shown as nobody)", "bubblewrap"),
                  without_namespaces("bubblewrap cannot create namespaces here")]
    if levels[-1].user == "nobody":  # nobody may not reach this Python (a private home, say)
        levels.append(Containment("process", "your user", levels[-1].tool))
    return levels


def environment(containment: Containment, workdir: Path) -> dict[str, str]:
    """The program's whole environment: no inherited variable, home and temporary files in its directory."""
    home = WORK if containment.level == "namespaces" else str(workdir)
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}
