"""Command-line plumbing: logging, malloc settings, one-line errors instead of tracebacks."""
from __future__ import annotations

import ctypes
import logging
import signal
import sys
from typing import Callable

from tqdm.contrib.logging import logging_redirect_tqdm

from util.environment import Environment
from util.errors import KeditError
from util.progress import quiet_library_bars


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory(system_malloc: bool = False) -> bool:
    """Make glibc's malloc serve every allocation from its heap and keep freed memory.

    By default glibc maps each block above 32 MB (and smaller ones until its threshold adapts)
    afresh and unmaps it when freed, so each large tensor of a step (batched activations, logits
    over the vocabulary) page-faults its memory in again: on a 2-core VM that was ~5 s of system
    time in a 35 s batch of value optimisation, ~15% of the step. Keeping the memory costs a
    higher resident size between peaks. `system_malloc` (KEDIT_SYSTEM_MALLOC=1, util/environment.py)
    leaves malloc as it is. Returns whether the setting was applied (glibc on Linux only)."""
    if system_malloc or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, kill), raised where Ctrl-C would be: a run rolls back and checkpoints
    the same way, and the process then exits with 128 + 15 as a shell expects."""

    exit_code = 128 + signal.SIGTERM


def raise_terminated(signum, frame) -> None:
    raise Terminated()


def run_cli(main: Callable[[], int | None]) -> None:
    """Run `main`; a `KeditError` (bad file, key, record, flag) ends in one line and exit code 2,
    Ctrl-C in exit code 130 and SIGTERM in 143, each after the run has checkpointed."""
    keep_freed_memory(Environment.read().system_malloc)  # before the command's own reading: it sets up the process
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_library_bars()
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with logging_redirect_tqdm():  # a log line printed while a bar is drawn clears it first
            code = main()
    except KeditError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)  # a run has said above how to continue it
        code = Terminated.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code or 0)
