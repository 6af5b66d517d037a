"""Child processes that never outlive the process that started them.

Every process geotrain starts (workers, coordinator, links, etcd) is started through
:func:`spawn`, which asks the Linux kernel to SIGKILL the child when its parent dies
(``PR_SET_PDEATHSIG``), so even a SIGKILLed launcher leaves no orphan behind. The signal is set
by exec'ing through util-linux's ``setpriv --pdeathsig KILL`` rather than in a ``preexec_fn``:
the launcher talks gRPC to etcd, and forking a process that runs gRPC threads and then running
Python code before exec trips gRPC's fork handlers (the child aborts with "epoll_wait error:
Bad file descriptor"). Children start in their own session, so a Ctrl-C at the terminal reaches
only the launcher, which decides how they stop. :func:`terminate_all` stops a set of children:
SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: have the kernel SIGKILL this child when its parent exits (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the launcher's own cleanup still applies
        pass
    # Ignore SIGINT in children: Ctrl-C reaches the whole foreground process group, and the
    # launcher decides how its children stop (SIGTERM, then SIGKILL).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_SETPRIV = shutil.which("setpriv")


def spawn(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
          stdout=None, stderr=None, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``argv`` as a child that dies with this process (its pid is the program's own)."""
    if _SETPRIV:
        return subprocess.Popen([_SETPRIV, "--pdeathsig", "KILL", "--", *argv], env=env, cwd=cwd, stdout=stdout,
                                stderr=stderr, stdin=stdin, start_new_session=True)
    return subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=stdout, stderr=stderr,
                            stdin=stdin, preexec_fn=die_with_parent)


def terminate_all(procs: Iterable[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM every live process, wait up to ``grace_s`` in total, then SIGKILL the rest."""
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
            p.wait()


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def env_with(**updates: str) -> dict[str, str]:
    """A copy of this process's environment with ``updates`` applied."""
    env = dict(os.environ)
    env.update(updates)
    return env
