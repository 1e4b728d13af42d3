"""One writer per run folder: an exclusive OS lock on the run folder itself, held for the life of
the process.

The lock is a `flock` on the run folder (results/<ALG>/run_NNN, opened read-only), so it holds
for as long as the folder does: no file can be deleted to break it (deleting a "stale" lock file
is a common habit, and a lock on such a file admitted a second writer). `flock` locks belong to the
open file, so the kernel releases them when the process ends, however it ends (crash, SIGKILL):
there is nothing stale to clean up. A file next to the folder (results/<ALG>/.run_NNN.lock) says
who holds the lock, for the refusal message only; deleting it changes nothing. A refused attempt
writes nothing, so every file of the run stays byte-identical.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from util.errors import RunError


def lock_path(run_path: Path) -> Path:
    """The file naming the holder (informational: the lock is on the folder)."""
    return run_path.parent / f".{run_path.name}.lock"


def holder(run_path: Path) -> str | None:
    """Who holds `run_path` (pid, host, since) when another open file holds its lock, else None.
    Takes and drops the lock to find out, so call it only where a refusal is the point."""
    fd = _open(run_path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(run_path)
    finally:
        os.close(fd)  # closing drops a lock taken just now
    return None


def _open(run_path: Path) -> int:
    try:
        return os.open(run_path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise RunError(f"cannot lock {run_path}: {err.strerror} (errno {err.errno})") from None


def _holder_text(run_path: Path) -> str:
    try:
        return lock_path(run_path).read_text(encoding="utf-8").strip() or "another process"
    except OSError:
        return "another process"


class RunLock:
    def __init__(self, run_path: Path, fd: int):
        self.run_path = run_path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, run_path: Path) -> "RunLock":
        """Lock `run_path` or fail with one line naming the run and the process holding it."""
        fd = _open(run_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunError(f"cannot lock {run_path}: {err.strerror} (errno {err.errno})") from None
            raise RunError(f"{run_path} is in use by {_holder_text(run_path)}: one process at a time writes a run; "
                           f"wait for it to end (or stop it) and continue then") from None
        line = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
        try:  # who holds it, for a refused process's message; the lock itself is already held
            lock_path(run_path).write_text(line, encoding="utf-8")
        except OSError:
            pass
        return cls(run_path, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the folder's descriptor drops the lock
            self._fd = None
