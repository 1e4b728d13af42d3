import resource
import sys

import pytest
import torch

from util.cli import keep_freed_memory


def _page_faults_of_a_fresh_64mb_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MB, written once and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults(monkeypatch):
    monkeypatch.setenv("KEDIT_SYSTEM_MALLOC", "1")
    assert not keep_freed_memory()
    monkeypatch.delenv("KEDIT_SYSTEM_MALLOC")
    assert keep_freed_memory()
    _page_faults_of_a_fresh_64mb_tensor()  # the heap grows once
    # a mapped-afresh 64 MB block faults in 16384 pages of 4 kB; a reused one hardly any
    assert _page_faults_of_a_fresh_64mb_tensor() < 1000
