"""The known-facts probe: facts the unedited model completes, scored again after edits.

A fact is "completed" when every token of its attribute is the model's top prediction after the
prompt (teacher-forced, `score_continuations`' argmax). The facts kept for a run are those the
unedited model completes, minus any whose subject the run edits; each evaluation point scores
the fraction still completed (1.0 before the first edit, by construction) and the mean per-token
NLL of the attributes. Chance is a random guess completing the attribute: one in |V| per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from data.known import KnownFact
from experiments.metrics.formulas import mean
from experiments.metrics.scoring import score_continuations
from util.models import LoadedModel
from util.sampling import seeded_sample


@dataclass(frozen=True)
class KnownResult:
    accuracy: float  # fraction of the facts still completed
    nll: float  # mean over facts of the attribute's mean per-token NLL
    n_items: int
    chance: float  # expected accuracy of uniform guessing over the vocabulary

    def to_dict(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "nll": self.nll, "n_items": self.n_items, "chance": self.chance}


def completed(lm: LoadedModel, facts: Sequence[KnownFact]) -> list[bool]:
    """Per fact: the model completes it (every attribute token is the argmax)."""
    scores = score_continuations(lm, [f.prompt for f in facts], [f.attribute for f in facts])
    return [s.argmax for s in scores]


def score_known(lm: LoadedModel, facts: Sequence[KnownFact]) -> KnownResult:
    scores = score_continuations(lm, [f.prompt for f in facts], [f.attribute for f in facts])
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    return KnownResult(
        accuracy=mean([float(s.argmax) for s in scores]),
        nll=mean([s.nll for s in scores]),
        n_items=len(scores),
        chance=mean([vocab ** -len(s.token_logprobs) for s in scores]),
    )


def probe_facts(known: Sequence[KnownFact], edited_subjects: Iterable[str], limit: int, seed: int) -> list[KnownFact]:
    """The facts a run scores: the known ones whose subject the run does not edit (compared
    case-insensitively), at most `limit` of them (a seeded sample, in file order)."""
    edited = {s.strip().casefold() for s in edited_subjects}
    kept = [f for f in known if f.subject.strip().casefold() not in edited]
    return seeded_sample(kept, limit, seed)
