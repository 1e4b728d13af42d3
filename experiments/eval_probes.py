"""Downstream probes (sst2, mrpc, cola, rte, mmlu, nli): k-shot prompts, label by likelihood.

The k solved examples are one seeded draw from the task's few-shot pool, shared by every test
item: the scorer then finds the common token prefix and runs it once (KV cache), so each item
costs only its own tokens. The label is the label word with the highest log-likelihood after the
prompt (no generation).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, Sequence

from experiments.metrics import accuracy, macro_f1, mcc
from util.models import LoadedModel
from util.scoring import score_label_words


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
    predictions: tuple[int, ...]
    gold: tuple[int, ...]
    shots: tuple[int, ...]  # indices into the few-shot pool, in prompt order

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
    predictions = scores.argmax(dim=1).tolist()
    gold = [int(example.label) for example in task.test]
    return ProbeResult(
        task=task.name,
        n_shots=n_shots,
        seed=seed,
        accuracy=accuracy(predictions, gold),
        macro_f1=macro_f1(predictions, gold),
        mcc=mcc(predictions, gold),
        predictions=tuple(predictions),
        gold=tuple(gold),
        shots=tuple(shots),
    )


def evaluate_probes(lm: LoadedModel, tasks: Sequence[Task], n_shots: int = 3, seed: int = 0, **kwargs: Any) -> dict[str, ProbeResult]:
    """Every task with the same shot count and seed (each task draws its own shots)."""
    return {task.name: evaluate_probe(lm, task, n_shots, seed, **kwargs) for task in tasks}
