"""One writer per run folder: an exclusive OS file lock, held for the life of the process.

The lock file sits next to the run folder (results/<ALG>/.run_NNN.lock), not inside it, so that a
refused attempt leaves every file of the run byte-identical. `flock` locks belong to the open file,
so the kernel releases them when the process ends, however it ends (crash, SIGKILL): there is no
stale lock to clean up. The file holds the current holder's pid and host, for the refusal message.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import TextIO

from util.errors import RunError


def lock_path(run_path: Path) -> Path:
    return run_path.parent / f".{run_path.name}.lock"


class RunLock:
    def __init__(self, path: Path, handle: TextIO):
        self.path = path
        self._handle = handle

    @classmethod
    def acquire(cls, run_path: Path) -> "RunLock":
        """Lock `run_path` or fail with one line naming the run and the process holding it."""
        path = lock_path(run_path)
        try:
            handle = path.open("a+", encoding="utf-8")  # "a+": never truncates another holder's line
        except OSError as err:
            raise RunError(f"cannot lock {run_path}: {path}: {err.strerror} (errno {err.errno})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunError(f"{run_path} is in use by {holder}: one process at a time writes a run; "
                           f"wait for it to end (or stop it) and continue then") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        handle.flush()
        return cls(path, handle)

    def release(self) -> None:
        self._handle.close()  # closing the file drops the lock; the file stays (unlinking it would race)
