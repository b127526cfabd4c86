"""One writer per output folder: an advisory lock that names the process holding it.

DVC's own lock stops two `dvc repro` in one workspace, but not a second trainer started by hand
(`python stages/train.py`, a notebook, `dvc repro` in a copy sharing scratch/): two trainers on one
state folder would interleave checkpoints and publish a LoRA pair from two different runs.

`fcntl.flock` is released by the kernel when the holder exits, however it exits (SIGKILL
included), so a crashed run never leaves a stale lock behind and nothing has to be cleaned up.
The lock file itself is not written atomically on purpose: it must stay the same inode while
held; its text (PID and command) is only a hint for the error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from wanlora.errors import UserError


class LockedError(UserError, RuntimeError):
    """Another live process holds the lock; the message names it and what to do."""


# Set by a process that holds a lock and launches workers for it (the train stage relaunching
# itself under torchrun): those workers run under their launcher's lock instead of refusing it.
HOLDER_ENV = "WANLORA_LOCK_HOLDER"


@contextlib.contextmanager
def hold(path: str | Path, what: str = "this output folder", launcher_pid: int | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on the file `path` (created if missing) for the `with` block.

    Raises LockedError at once, without waiting, when another process holds it, unless that
    process is `launcher_pid`, the process that started this one to work under its lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            if launcher_pid is None or not holder.startswith(f"PID {launcher_pid} "):
                raise LockedError(
                    f"{path}: {what} is in use by {holder}. Fix: wait for that run to finish or stop it "
                    "(the lock goes with the process, so nothing needs deleting afterwards)"
                ) from None
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"PID {os.getpid()} ({' '.join(sys.argv)[:200]})\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def launcher_pid() -> int | None:
    """The PID of the lock-holding process that launched this one (HOLDER_ENV), if any."""
    value = os.environ.get(HOLDER_ENV, "")
    return int(value) if value.isdigit() else None


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; elsewhere nothing).

    torchrun starts every worker in a session of its own, so a SIGKILL to the launcher's process
    group (what a killed `dvc repro` or a batch scheduler sends) would leave the workers training
    on, writing checkpoints under a lock nobody holds any more.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request: it would never fire
        os.kill(os.getpid(), signal.SIGKILL)
