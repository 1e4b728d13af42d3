"""One evaluation case: the edit request plus the prompts that measure it."""
from __future__ import annotations

from dataclasses import dataclass, field

from util.requests import EditRequest


@dataclass(frozen=True)
class CaseRecord:
    request: EditRequest
    # Paraphrases of the rewrite prompt (subject filled in); success = target_new preferred.
    paraphrase_prompts: tuple[str, ...] = ()
    # Prompts about other subjects that must keep their answers: (prompt, true answer).
    # In CounterFact every answer is target_true.
    neighborhood: tuple[tuple[str, str], ...] = ()
    # CounterFact extras for generation metrics: prompts about subjects that have target_new as
    # their true attribute (consistency reference) and free-generation prompts.
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    source: str = ""  # dataset name ("cf", "flat_cf", "zsre", "custom:<file>")

    @property
    def case_id(self):
        return self.request.case_id
