import ctypes
import sys

import pytest
import torch

from util.cli import keep_freed_memory


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
