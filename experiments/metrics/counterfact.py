"""CounterFact-style evaluation of edited facts: efficacy, paraphrase, neighbourhood.

Every prompt is scored teacher-forced with target_new and with the true answer (mean per-token
NLL); all prompts of all records go through one `score_continuations` call, so a whole run is a
few padded batches. Records without target_true (zsRE-like) get argmax accuracy only.

Sign convention of the magnitudes (ROME's): each is "in the direction of success", so higher is
better everywhere: rewrite/paraphrase p_new - p_true, neighbourhood p_true - p_new.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Collection, Mapping, Sequence

from data.records import CaseRecord
from experiments.metrics.formulas import harmonic_mean, mean, prefers, prob_gap
from experiments.metrics.scoring import score_continuations
from util.models import LoadedModel

SECTIONS = ("rewrite", "paraphrase", "neighborhood")


@dataclass(frozen=True)
class PromptScore:
    prompt: str
    nll_new: float | None  # mean per-token NLL of target_new; None on neighbourhood prompts without target_true
    nll_true: float | None  # of the true answer (target_true, or the neighbourhood prompt's own answer)
    argmax: bool  # the expected answer is the argmax at every token: target_new on rewrite/paraphrase, the true answer on neighbourhood
    token_acc: float | None = None  # fraction of the expected answer's tokens that are the argmax (teacher-forced)


@dataclass(frozen=True)
class CaseResult:
    case_id: Any
    rewrite: tuple[PromptScore, ...]
    paraphrase: tuple[PromptScore, ...]
    neighborhood: tuple[PromptScore, ...]

    def metrics(self) -> dict[str, float]:
        """Per case: <section>_success (fraction succeeding), <section>_magnitude, <section>_acc
        (every token the argmax) and <section>_token_acc (mean over prompts of the fraction of
        tokens that are the argmax, zsRE's accuracy in MEND/ROME/AlphaEdit). Comparisons are NaN
        when the record has no true answer or no prompts of a section."""
        out: dict[str, float] = {}
        for section in SECTIONS:
            scores = getattr(self, section)
            compared = [s for s in scores if s.nll_new is not None and s.nll_true is not None]
            new, true = [s.nll_new for s in compared], [s.nll_true for s in compared]
            if section == "neighborhood":  # success = the old answer stays more likely
                new, true = true, new
            out[f"{section}_success"] = prefers(new, true)
            out[f"{section}_magnitude"] = prob_gap(new, true)
            out[f"{section}_acc"] = float(sum(s.argmax for s in scores) / len(scores)) if scores else math.nan
            out[f"{section}_token_acc"] = mean([s.token_acc for s in scores if s.token_acc is not None])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> None)."""
        return {**asdict(self), "metrics": {k: _finite(v) for k, v in self.metrics().items()}}


def evaluate_cases(lm: LoadedModel, records: Sequence[CaseRecord], batch_size: int = 64, max_tokens: int = 8192) -> list[CaseResult]:
    """Score every rewrite, paraphrase and neighbourhood prompt of every record."""
    prompts: list[str] = []
    targets: list[str] = []

    def add(prompt: str, target: str | None) -> int | None:
        if target is None:
            return None
        prompts.append(prompt)
        targets.append(target)
        return len(prompts) - 1

    # (section, prompt, index of the target_new pair, index of the true-answer pair) per record
    plans: list[list[tuple[str, str, int | None, int | None]]] = []
    for record in records:
        request = record.request
        plan = []
        for section, prompt_list in (("rewrite", [request.text]), ("paraphrase", record.paraphrase_prompts)):
            for prompt in prompt_list:
                plan.append((section, prompt, add(prompt, request.target_new), add(prompt, request.target_true)))
        for prompt, answer in record.neighborhood:
            # Without target_true the record is scored for accuracy only: no comparison pair.
            new = add(prompt, request.target_new) if request.target_true is not None else None
            plan.append(("neighborhood", prompt, new, add(prompt, answer)))
        plans.append(plan)

    scores = score_continuations(lm, prompts, targets, batch_size=batch_size, max_tokens=max_tokens)
    results = []
    for record, plan in zip(records, plans):
        by_section: dict[str, list[PromptScore]] = {s: [] for s in SECTIONS}
        for section, prompt, new, true in plan:
            expected = true if section == "neighborhood" else new
            by_section[section].append(PromptScore(
                prompt=prompt,
                nll_new=scores[new].nll if new is not None else None,
                nll_true=scores[true].nll if true is not None else None,
                argmax=scores[expected].argmax,
                token_acc=scores[expected].token_accuracy,
            ))
        results.append(CaseResult(record.case_id, *(tuple(by_section[s]) for s in SECTIONS)))
    return results


def summarize(results: Sequence[CaseResult], weights: Sequence[float] | None = None) -> dict[str, float | int | None]:
    """Run-level scores: means over cases of the per-case metrics, ES/PS/NS and their magnitudes
    EM/PM/NM, and S = harmonic mean of ES, PS, NS (None when undefined, e.g. no true answers);
    weighted by `weights` (one per case) where given."""
    return summarize_metrics([r.metrics() for r in results], weights)


def summarize_metrics(per_case: Sequence[Mapping[str, float | None]], weights: Sequence[float] | None = None) -> dict[str, float | int | None]:
    """`summarize` from the per-case metrics (CaseResult.metrics(), or their JSON form with None
    for NaN, as cases.jsonl keeps them)."""
    summary: dict[str, float] = {}
    for key in per_case[0] if per_case else ():
        summary[key] = mean([math.nan if m[key] is None else m[key] for m in per_case], weights)
    es, ps, ns = (summary.get(f"{s}_success", math.nan) for s in SECTIONS)
    named = {
        "ES": es, "PS": ps, "NS": ns, "S": harmonic_mean([es, ps, ns]),
        **{name: summary.get(f"{s}_magnitude", math.nan) for name, s in zip(("EM", "PM", "NM"), SECTIONS)},
    }
    return {"n_cases": len(per_case), **{k: _finite(v) for k, v in {**named, **summary}.items()}}


def stratified_weights(case_ids: Sequence[int], latest: Collection[int], facts_in_model: int) -> list[float] | None:
    """Weights that make a mean over the facts scored for retention (every fact of the latest
    batch, plus a sample of the earlier ones) estimate the mean over all `facts_in_model`: a fact
    of the latest batch stands for itself, a sampled earlier fact for its share of the earlier
    facts (stratified sampling). A plain mean would give the latest batch, scored right after its
    edit, the weight of 100 of 293 facts where it is 100 of 2,000. None (a plain mean) where the
    scored facts are all the facts in the model, or no earlier fact was sampled."""
    earlier = [c for c in case_ids if c not in latest]
    n_latest = len(case_ids) - len(earlier)
    if len(case_ids) >= facts_in_model or not earlier:
        return None
    share = (facts_in_model - n_latest) / len(earlier)
    return [1.0 if c in latest else share for c in case_ids]


def retention_summary(per_case: Sequence[Mapping[str, float | None]], case_ids: Sequence[int], latest: Collection[int],
                      facts_in_model: int) -> dict[str, Any]:
    """The retention scores after a batch (`latest`, its case ids) over the facts scored
    (`case_ids`, with their metrics `per_case`), estimating the mean over all facts in the model
    (`stratified_weights`); with a stratified estimate, the plain means over the scored facts too."""
    latest = set(latest)
    weights = stratified_weights(case_ids, latest, facts_in_model)
    summary = summarize_metrics(per_case, weights)
    if weights is None:
        return {**summary, "estimate": "mean"}
    plain = summarize_metrics(per_case)
    return {**summary, "estimate": "stratified", "latest_facts": sum(c in latest for c in case_ids),
            "unweighted": {k: plain[k] for k in ("ES", "PS", "NS", "S")}}


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value
