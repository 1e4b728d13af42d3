"""Batched continuation scoring equals an independent one-prompt-at-a-time full-logits computation."""
from __future__ import annotations

import pytest
import torch

from experiments.metrics.scoring import score_continuations, score_label_words
import experiments.metrics.scoring as scoring
from util.errors import RequestError
from util.tokens import encode_with_target

PROMPTS = [
    "The capital of France is",
    "Porsche 911, created by",
    "Porsche 911, created by",
    "Porsche 911, created by",
    "A",
    "Once upon a time, in a small village at the edge of a very large forest, there lived a",
    "The capital of France is",
]
TARGETS = ["Paris", "Honda", "Porsche", "Hond", "b c d e f", "woodcutter", "Paris"]
SHOTS = ("Review: a wonderful, moving film\nSentiment: positive\n\nReview: dull and far too long\n"
         "Sentiment: negative\n\nReview: the cast is superb\nSentiment: positive\n\n")


def reference(lm, prompt: str, target: str) -> tuple[list[float], bool]:
    """Token log-probs and argmax flag from one unpadded forward with full logits."""
    ids, start = encode_with_target(lm.tok, prompt, target)
    logprobs = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].double(), dim=-1)
    values = [float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids))]
    argmax = all(int(logprobs[i - 1].argmax()) == ids[i] for i in range(start, len(ids)))
    return values, argmax


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_matches_unbatched_full_logits(tiny, batch_size):
    scores = score_continuations(tiny, PROMPTS, TARGETS, batch_size=batch_size)
    for prompt, target, score in zip(PROMPTS, TARGETS, scores):
        values, argmax = reference(tiny, prompt, target)
        torch.testing.assert_close(torch.tensor(score.token_logprobs, dtype=torch.float64), torch.tensor(values, dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        assert score.nll == pytest.approx(-sum(values) / len(values), abs=1e-5)
        assert score.argmax == argmax


def test_argmax_flag_follows_the_top_token(tiny):
    """A hook makes one token the top prediction everywhere: a one-token target equal to it is
    the argmax, another one-token target is not."""
    ids, start = encode_with_target(tiny.tok, "It is", "the")
    other, other_start = encode_with_target(tiny.tok, "It is", "and")
    assert len(ids) - start == 1 and len(other) - other_start == 1
    boosted = ids[start]

    def boost(_module, _args, output):
        output = output.clone()
        output[..., boosted] += 1e4
        return output

    handle = tiny.model.get_submodule(tiny.arch.unembed).register_forward_hook(boost)
    try:
        yes, no = score_continuations(tiny, ["It is", "It is"], ["the", "and"])
    finally:
        handle.remove()
    assert yes.argmax and not no.argmax
    assert yes.nll == pytest.approx(0.0, abs=1e-4)


def test_rows_are_shared_by_prefix(tiny, monkeypatch):
    """Targets after the same prompt whose inputs are prefixes of each other share a row: here
    "Hond" (one token) and "Honda" (" Hond" "a") need one row, "Porsche" (" P" "ors" "che") another."""
    seen: list[int] = []
    forward = scoring._forward

    def spy(lm, sequences, cached, offset):
        seen.extend(len(s) for s in sequences)
        return forward(lm, sequences, cached, offset)

    monkeypatch.setattr(scoring, "_forward", spy)
    prompt = "Porsche 911, created by"
    targets = ["Honda", "Porsche", "Hond", "Porsche", "Honda"]
    score_continuations(tiny, [prompt] * len(targets), targets)
    needed = [len(encode_with_target(tiny.tok, prompt, t)[0]) - 1 for t in ("Honda", "Porsche")]
    assert sorted(seen) == sorted(needed)


def test_shared_prefix_cache_matches_full_forward(tiny, monkeypatch):
    offsets: list[int] = []
    forward = scoring._forward

    def spy(lm, sequences, cached, offset):
        offsets.append(offset)
        return forward(lm, sequences, cached, offset)

    monkeypatch.setattr(scoring, "_forward", spy)
    items = ["a gripping story", "I want my money back, it was awful", "fine"]
    prompts = [SHOTS + f"Review: {item}\nSentiment:" for item in items]
    words = ["positive", "negative", "so so"]
    total = score_label_words(tiny, prompts, words, reduction="sum", batch_size=2, min_shared_prefix=16)
    average = score_label_words(tiny, prompts, words, reduction="mean", batch_size=2, min_shared_prefix=16)
    for row, prompt in enumerate(prompts):
        for col, word in enumerate(words):
            values, _ = reference(tiny, prompt, word)
            assert float(total[row, col]) == pytest.approx(sum(values), abs=1e-5)
            assert float(average[row, col]) == pytest.approx(sum(values) / len(values), abs=1e-5)
    assert offsets and all(o >= 16 for o in offsets)  # the cache was used


def test_edge_cases(tiny):
    assert score_continuations(tiny, [], []) == []
    with pytest.raises(ValueError):
        score_continuations(tiny, ["a"], [])


def test_no_context_is_an_error(tiny_gpt2):
    # This tokenizer adds no BOS: an empty prompt leaves nothing to predict the first token from.
    if tiny_gpt2.tok("x")["input_ids"][0] == tiny_gpt2.tok.bos_token_id:
        pytest.skip("tokenizer adds a BOS")
    with pytest.raises(RequestError):
        score_continuations(tiny_gpt2, [""], ["Paris"])
