"""Downstream probes (sst2, mrpc, cola, rte, mmlu, nli), scored two ways:

- `evaluate_probe` (protocol kedit): k-shot prompts, the label word with the highest
  log-likelihood after the prompt wins (no generation). The k solved examples are one seeded draw
  from the task's few-shot pool, shared by every test item: the scorer then finds the common
  token prefix and runs it once (KV cache), so each item costs only its own tokens.
- `evaluate_probe_generated` (protocol alphaedit): AlphaEdit's glue_eval, zero-shot prompts in
  its wording, a few greedily generated tokens, and the label whose keyword appears first in
  the rule order in the generated answer; no keyword = no answer (label -1, counted wrong).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, Sequence

from experiments.metrics.formulas import accuracy, macro_f1, mcc, weighted_f1
from experiments.metrics.generation import generate
from experiments.metrics.scoring import score_label_words
from util.models import LoadedModel


class Example(Protocol):
    label: int  # index into the task's label_words


class Task(Protocol):
    """What a probe set offers (data.probes.ProbeSet satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def label_words(self) -> Sequence[str]: ...
    @property
    def few_shot(self) -> Sequence[Example]: ...
    @property
    def test(self) -> Sequence[Example]: ...
    def format(self, example: Any, with_answer: bool = False) -> str: ...


@dataclass(frozen=True)
class ProbeResult:
    task: str
    n_shots: int
    seed: int
    accuracy: float
    macro_f1: float
    mcc: float
    predictions: tuple[int, ...]  # -1: no answer could be read (generated answers only)
    gold: tuple[int, ...]
    shots: tuple[int, ...]  # indices into the few-shot pool, in prompt order
    weighted_f1: float = math.nan  # F1 per class weighted by its gold count (AlphaEdit's score)
    invalid: int = 0  # items whose generated answer named no label

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def instruction_of(task: Task) -> str:
    """The task's instruction line, if it has one (data.probes keeps it on ProbeSet.task)."""
    own = getattr(task, "instruction", None)
    return own if isinstance(own, str) else getattr(getattr(task, "task", None), "instruction", "") or ""


def choose_shots(task: Task, n_shots: int, seed: int) -> list[int]:
    """A seeded draw (without replacement, in drawn order) of n_shots pool indices."""
    if n_shots > len(task.few_shot):
        raise ValueError(f"{task.name}: {n_shots} shots asked, the few-shot pool holds {len(task.few_shot)}")
    return random.Random(seed).sample(range(len(task.few_shot)), n_shots)


def build_prompts(task: Task, n_shots: int, seed: int) -> tuple[list[str], list[int]]:
    """Prompts for every test item (instruction, solved shots, the item without its answer; blank
    lines between blocks) and the chosen shot indices."""
    shots = choose_shots(task, n_shots, seed)
    head = [b for b in (instruction_of(task),) if b]
    head += [task.format(task.few_shot[i], with_answer=True) for i in shots]
    return ["\n\n".join([*head, task.format(example, with_answer=False)]) for example in task.test], shots


def evaluate_probe(
    lm: LoadedModel,
    task: Task,
    n_shots: int = 3,
    seed: int = 0,
    reduction: Literal["sum", "mean"] = "sum",
    batch_size: int = 32,
    max_tokens: int = 8192,
) -> ProbeResult:
    """Accuracy, macro F1 and MCC of the likelihood-chosen label words on the task's test items."""
    prompts, shots = build_prompts(task, n_shots, seed)
    scores = score_label_words(lm, prompts, list(task.label_words), reduction, batch_size, max_tokens)
    return probe_result(task, scores.argmax(dim=1).tolist(), n_shots, seed, shots)


def probe_result(task: Task, predictions: Sequence[int], n_shots: int, seed: int, shots: Sequence[int]) -> ProbeResult:
    gold = [int(example.label) for example in task.test]
    return ProbeResult(
        task=task.name, n_shots=n_shots, seed=seed, accuracy=accuracy(predictions, gold),
        macro_f1=macro_f1(predictions, gold), mcc=mcc(predictions, gold), predictions=tuple(predictions),
        gold=tuple(gold), shots=tuple(shots), weighted_f1=weighted_f1(predictions, gold),
        invalid=sum(p == -1 for p in predictions),
    )


@dataclass(frozen=True)
class AnswerFormat:
    """A zero-shot prompt and how a generated answer is read (AlphaEdit's glue_eval/<task>_eval.py)."""

    template: str  # str.format over the example's texts; the model continues after it
    marker: str  # the answer is the text after the last occurrence of this (prompt + generation)
    keywords: tuple[tuple[str, int], ...]  # (keyword, label), tried in order in the lower-cased answer

    def read(self, text: str) -> int:
        answer = text.split(self.marker)[-1].strip().lower()
        return next((label for keyword, label in self.keywords if keyword in answer), -1)


# Labels are this project's indices (data/probes.py: GLUE's, RTE and nli 0 = entailment).
# AlphaEdit's RTE scorer reads "true" as label 1, which is GLUE's not_entailment; kept as it is,
# so its RTE numbers are comparable with the paper's (its nli scorer maps entailment to "true").
ALPHAEDIT_FORMATS: dict[str, AnswerFormat] = {
    "sst2": AnswerFormat("Review :{0}\nSentiment :", "Sentiment :", (("positive", 1), ("negative", 0))),
    "mrpc": AnswerFormat("Are the sentences paraphrases of each other.\nSentence 1: {0}\nSentence 2: {1}\nAnswer:",
                         "Answer:", (("yes", 1), ("no", 0))),
    "cola": AnswerFormat("Is this sentence linguistically acceptable?\nSentence: {0}\nAnswer: ", "Answer:",
                         (("yes", 1), ("no", 0))),
    "rte": AnswerFormat("{0}\nquestion: {1} True or False?\nanswer:", "answer:", (("false", 0), ("true", 1))),
    "nli": AnswerFormat("{0} entails the {1} True or False? Answer:", "True or False? Answer:", (("true", 0), ("false", 1))),
    "mmlu": AnswerFormat("Question: {0}\n(A) {1}\n(B) {2}\n(C) {3}\n(D) {4}\nAnswer:", "Answer:",
                         (("a\n", 0), ("b\n", 1), ("c\n", 2), ("d\n", 3))),
}


def evaluate_probe_generated(lm: LoadedModel, task: Task, new_tokens: int = 5, batch_size: int = 16) -> ProbeResult:
    """AlphaEdit's probe: each test item's zero-shot prompt, `new_tokens` greedy tokens, the label
    read from them (ALPHAEDIT_FORMATS); accuracy counts unreadable answers as wrong."""
    form = ALPHAEDIT_FORMATS[task.name]
    prompts = [form.template.format(*example.texts) for example in task.test]
    continuations = generate(lm, prompts, max_new_tokens=new_tokens, top_k=None, batch_size=batch_size)
    return probe_result(task, [form.read(p + c) for p, c in zip(prompts, continuations)], 0, 0, ())


