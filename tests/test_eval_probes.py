"""Probe scoring: label words chosen by likelihood, checked against independent full forwards."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from experiments.metrics.formulas import accuracy, macro_f1, mcc
from experiments.metrics.probes import build_prompts, choose_shots, evaluate_probe
from util.tokens import encode_with_target


@dataclass(frozen=True)
class Item:
    text: str
    label: int


@dataclass(frozen=True)
class HandTask:
    name: str
    label_words: tuple[str, ...]
    few_shot: tuple[Item, ...]
    test: tuple[Item, ...]
    instruction: str = "Classify the sentiment of each review."

    def format(self, example: Item, with_answer: bool = False) -> str:
        text = f"Review: {example.text}\\nSentiment:".replace("\\n", "\n")
        return f"{text} {self.label_words[example.label]}" if with_answer else text


TASK = HandTask(
    "hand-sst",
    ("negative", "positive", "mixed feelings"),  # a two-token word exercises the multi-token path
    tuple(Item(t, l) for t, l in [("a joy to watch", 1), ("tedious and shallow", 0), ("brilliant acting", 1),
                                  ("I fell asleep", 0), ("good but too long", 2)]),
    tuple(Item(t, l) for t, l in [("wonderful", 1), ("a waste of time", 0), ("fine, I guess", 2),
                                  ("the best film this year", 1), ("boring", 0)]),
)


def log_likelihood(lm, prompt: str, word: str) -> float:
    ids, start = encode_with_target(lm.tok, prompt, word)
    logprobs = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids)))


def test_prompts_are_seeded():
    assert choose_shots(TASK, 3, seed=1) == choose_shots(TASK, 3, seed=1)
    assert choose_shots(TASK, 5, seed=1) != choose_shots(TASK, 5, seed=2)  # different orders of all 5
    prompts, shots = build_prompts(TASK, 2, seed=0)
    assert len(prompts) == len(TASK.test) and len(shots) == 2
    first = TASK.format(TASK.few_shot[shots[0]], with_answer=True)
    assert prompts[0] == "\n\n".join([TASK.instruction, first, TASK.format(TASK.few_shot[shots[1]], True), TASK.format(TASK.test[0])])
    with pytest.raises(ValueError):
        choose_shots(TASK, 6, seed=0)


def test_labels_match_independent_full_forwards(tiny):
    result = evaluate_probe(tiny, TASK, n_shots=3, seed=0, batch_size=2)
    prompts, shots = build_prompts(TASK, 3, seed=0)
    expected = []
    for prompt in prompts:
        scores = [log_likelihood(tiny, prompt, w) for w in TASK.label_words]
        assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-4  # no near-tie: the choice is well defined
        expected.append(max(range(len(scores)), key=scores.__getitem__))
    gold = [item.label for item in TASK.test]
    assert list(result.predictions) == expected and list(result.gold) == gold
    assert list(result.shots) == shots
    assert result.accuracy == accuracy(expected, gold)
    assert result.macro_f1 == macro_f1(expected, gold) and result.mcc == mcc(expected, gold)


def test_real_probe_set_interface(tiny_gpt2, shared_data):
    """data.probes.ProbeSet satisfies the task protocol; results serialise."""
    import json

    from data.probes import read_probe

    probe = read_probe("sst2", shared_data / "glue" / "sst2.jsonl", limit=4, seed=0)
    result = evaluate_probe(tiny_gpt2, probe, n_shots=2)
    assert len(result.predictions) == 4 and all(0 <= p < 2 for p in result.predictions)
    prompts, _ = build_prompts(probe, 2, seed=0)
    assert prompts[0].startswith(probe.task.instruction) and prompts[0].endswith("Sentiment:")
    json.dumps(result.to_dict(), allow_nan=False)


@pytest.mark.slow
def test_embedded_scores_match_full_forwards(embedded, shared_data):
    """On the real model and probe file (shared prefix cached), the label log-likelihoods equal
    independent full forwards."""
    from data.probes import read_probe
    from experiments.metrics.scoring import score_label_words

    probe = read_probe("sst2", shared_data / "glue" / "sst2.jsonl", limit=4, seed=0)
    prompts, _ = build_prompts(probe, 4, seed=0)
    got = score_label_words(embedded, prompts, list(probe.label_words))
    expected = [[log_likelihood(embedded, p, w) for w in probe.label_words] for p in prompts]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
