"""Perplexity equals exp(mean NLL) of a direct per-window computation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from experiments.metrics.perplexity import nll_of_ids, perplexity, text_slice

TEXT = (" = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ "
        "playing video game developed by Sega and Media.Vision for the PlayStation Portable . Released in "
        "January 2011 in Japan , it is the third game in the Valkyria series . ") * 4


def direct_nll(lm, ids: list[int], window: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = torch.tensor([ids[start : start + window]])
        if chunk.shape[1] < 2:
            continue
        logits = lm.model(chunk).logits[0].double()
        total += float(F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return total, count


def test_text_slice_is_a_prefix_of_the_whole_file(tmp_path, tokenizer):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    whole = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert text_slice(tokenizer, path, 50) == whole[:50]
    with pytest.raises(ValueError):
        text_slice(tokenizer, path, len(whole) + 1)


@pytest.mark.parametrize("window,batch_size", [(32, 3), (50, 8), (17, 1)])
def test_matches_direct_computation(tiny, tmp_path, window, batch_size):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    n_tokens = 120  # not a multiple of the windows: the last one is shorter and padded
    ids = text_slice(tiny.tok, path, n_tokens)
    total, count = direct_nll(tiny, ids, window)
    got_total, got_count = nll_of_ids(tiny, ids, window, batch_size, chunk=40)
    assert got_count == count
    assert got_total == pytest.approx(total, rel=1e-5)
    result = perplexity(tiny, path, n_tokens=n_tokens, window=window, batch_size=batch_size)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.n_predicted == count and result.n_tokens == n_tokens


@pytest.mark.slow
def test_embedded_wikitext_perplexity(embedded, shared_data):
    result = perplexity(embedded, shared_data / "wiki" / "wikitext-2-raw-test.txt", n_tokens=1024, window=256)
    assert 5 < result.perplexity < 100, result
