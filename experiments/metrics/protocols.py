"""Evaluation protocols: how a run's numbers are defined, named so every number can say which.

Editing papers disagree less about editors than about how they measure them (EasyEdit users report
the same editor at 0.24 and 94.56 under two harnesses). A protocol fixes the choices that move the
numbers: the default options of the measurements (shots, probe items, tasks), how a probe's answer
is chosen, how long generations run and how their text is cleaned, which facts the final
fluency/consistency covers, and which summary fields fill the papers' columns (Efficacy,
Generalization, Specificity, Fluency, Consistency) at what scale.

    kedit      this project's: 3-shot probes scored by label-word log-likelihood, 50 seeded items,
               40 new tokens per generation from the latest facts' prompts, numbers as fractions
    alphaedit  AlphaEdit's (ICLR 2025) evaluation code: zero-shot probes in its wording answered by
               5 greedy tokens, its first 100 items, 6 tasks; generations of 100 tokens in all
               (prompt included) over every edited fact at the end; zsRE by per-token accuracy;
               columns x100 as in its Table 1

CounterFact Efficacy/Generalization/Specificity are the same under both (fraction of prompts where
the new / true target has the lower mean per-token NLL); they differ on zsRE, where the records
have no true target to compare with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from experiments.metrics.generation import alphaedit_text
from experiments.metrics.probes import ProbeResult, evaluate_probe, evaluate_probe_generated
from util.errors import KeditError
from util.models import LoadedModel

# The columns of the papers' tables (AlphaEdit's Table 1), filled by `paper_columns`.
COLUMNS = ("Efficacy", "Generalization", "Specificity", "Fluency", "Consistency")


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    # RunOptions fields the protocol sets unless given on the command line.
    option_defaults: Mapping[str, Any]
    # (lm, probe set, options) -> ProbeResult
    score_probe: Callable[[LoadedModel, Any, Any], ProbeResult]
    probe_items: str  # "seeded": a seeded sample of the test items; "first": the first n in file order
    probe_score: str  # ProbeResult field shown as the probe's number
    probe_label: str  # its short name in tables
    generation_length: int | None  # total tokens (prompt + continuation); None: --generation_tokens new tokens
    clean_text: Callable[[str], str] | None  # applied to generated texts before scoring
    final_generation_all: bool  # at the end, generate from every edited fact's prompts (not only the latest)
    zsre_accuracy: str  # without a true target (zsRE): <section>_acc (every token) or <section>_token_acc (per token)
    scale: float  # multiplier of the papers' columns
    definitions: Mapping[str, str] = field(default_factory=dict)  # column -> what it is under this protocol
    few_shot: bool = True  # its probes show --number_of_few_shots solved examples (else zero-shot whatever the flag)


def _likelihood_probe(lm: LoadedModel, probe, options) -> ProbeResult:
    return evaluate_probe(lm, probe, options.number_of_few_shots, options.seed)


def _generated_probe(lm: LoadedModel, probe, options) -> ProbeResult:
    return evaluate_probe_generated(lm, probe)


KEDIT = Protocol(
    name="kedit",
    description="few-shot probes by label-word log-likelihood on a seeded sample of items; generation from the latest "
                "facts' prompts; fractions",
    option_defaults={},
    score_probe=_likelihood_probe,
    probe_items="seeded",
    probe_score="accuracy",
    probe_label="acc",
    generation_length=None,
    clean_text=None,
    final_generation_all=False,
    zsre_accuracy="acc",
    scale=1.0,
    definitions={
        "Efficacy": "rewrite prompt: P(new) > P(true) by mean per-token NLL (zsRE: every token of the new target is the argmax)",
        "Generalization": "paraphrase prompts, as Efficacy",
        "Specificity": "neighbourhood prompts: P(true) > P(new) (zsRE: every token of the NQ answer is the argmax)",
        "Fluency": "weighted 2/3-gram entropy (bits) of prompt + --generation_tokens sampled tokens (top-5), latest facts' prompts",
        "Consistency": "TF-IDF cosine of the generated texts with the record's attribute prompts",
        "probes": "--number_of_few_shots shots (seeded draw); label word with the highest summed log-likelihood; accuracy",
    },
)

ALPHAEDIT = Protocol(
    name="alphaedit",
    description="AlphaEdit's evaluation: zero-shot probes in its wording answered by 5 greedy tokens on the first items "
                "of each task (its defaults: 100 items, 6 tasks); generation 100 tokens in all over every edited fact "
                "at the end; zsRE per-token accuracy; x100",
    option_defaults={"number_of_few_shots": 0, "number_of_tests": 100,
                     "downstream_tasks": ("sst2", "mrpc", "cola", "rte", "mmlu", "nli")},
    score_probe=_generated_probe,
    probe_items="first",
    probe_score="weighted_f1",
    probe_label="f1",
    generation_length=100,
    clean_text=alphaedit_text,
    final_generation_all=True,
    zsre_accuracy="token_acc",
    scale=100.0,
    definitions={
        "Efficacy": "rewrite prompt: P(new) > P(true) by mean per-token NLL (zsRE: fraction of the new target's tokens that "
                    "are the argmax, teacher-forced)",
        "Generalization": "paraphrase prompts, as Efficacy",
        "Specificity": "neighbourhood prompts: P(true) > P(new) (zsRE: per-token accuracy on the NQ answer)",
        "Fluency": "weighted 2/3-gram entropy (bits) x100 of prompt + top-5 samples up to 100 tokens, NFKD, every "
                   "generation prompt of every edited fact after the last edit",
        "Consistency": "TF-IDF cosine x100 of those texts with the record's attribute prompts (AlphaEdit: Wikipedia "
                       "snippets about target_new, not shipped offline)",
        "probes": "zero-shot in AlphaEdit's wording, the first --number_of_tests test items, 5 greedy tokens, keyword rule; weighted F1",
    },
    few_shot=False,
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (KEDIT, ALPHAEDIT)}


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise KeditError(f"unknown protocol '{name}'; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def paper_columns(name: str, retained: Mapping[str, Any] | None, generation: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The papers' columns from a run's final retention summary and generation row, under
    protocol `name`: CounterFact records fill Efficacy..Specificity with the comparisons (ES, PS,
    NS); records without a true target (zsRE) with the protocol's accuracy."""
    spec = protocol(name)
    retained, generation = retained or {}, generation or {}

    def pick(comparison: str, section: str) -> float | None:
        value = retained.get(comparison)
        return value if value is not None else retained.get(f"{section}_{spec.zsre_accuracy}")

    values = {
        "Efficacy": pick("ES", "rewrite"), "Generalization": pick("PS", "paraphrase"), "Specificity": pick("NS", "neighborhood"),
        "Fluency": generation.get("fluency"), "Consistency": generation.get("consistency"),
    }
    return {column: None if v is None else v * spec.scale for column, v in values.items()}
