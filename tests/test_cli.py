import ctypes
import os
import subprocess
import sys

import pytest
import torch

from util.cli import keep_freed_memory
from util.paths import PROJECT_ROOT


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_serves_large_tensors_from_the_heap(monkeypatch):
    """A 64 MB block lies above glibc's 32 MB mmap ceiling: by default it is mapped afresh (an
    address far above the heap's break, page-faulted in at every use); with the setting it comes
    from the heap, below the break, and is reused once freed."""
    libc = ctypes.CDLL("libc.so.6")
    libc.sbrk.restype = ctypes.c_void_p
    monkeypatch.setenv("KEDIT_SYSTEM_MALLOC", "1")
    assert not keep_freed_memory()
    monkeypatch.delenv("KEDIT_SYSTEM_MALLOC")
    assert keep_freed_memory()
    block = torch.ones(16 * 2**20)
    assert block.data_ptr() < libc.sbrk(0)


def test_sigterm_and_ctrl_c_end_with_the_shell_exit_codes():
    """128 + the signal's number (143, 130), after the KeyboardInterrupt path (rollback and
    checkpoint in a run)."""
    codes = {}
    for signal_name in ("SIGTERM", "SIGINT"):
        script = ("import os, signal, time\nfrom util.cli import run_cli\n\n\ndef main():\n"
                  f"    os.kill(os.getpid(), signal.{signal_name})\n    time.sleep(30)\n\n\nrun_cli(main)\n")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
        codes[signal_name] = result.returncode
    assert codes == {"SIGTERM": 143, "SIGINT": 130}
