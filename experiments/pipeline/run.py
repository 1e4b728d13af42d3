"""The run loop: edit batch after batch, measure after each, evaluate every K edits, checkpoint.

Per batch ("current"): the editor's deltas, CounterFact scores of the batch's facts, update
norms, the value-optimisation and per-layer records, and, every G edits, generation fluency.
Before the first edit, every K edits and at the end: retention (CounterFact scores of every fact
in the model), downstream probes and perplexity; then a checkpoint. Mode: sequential and
sequential-batched runs keep every edit; batched runs restore W0 after each batch.

Ctrl-C in the middle of a batch rolls back to the batch's start (weights, editor state, stream
sizes) and checkpoints there, so nothing inconsistent is ever saved; a continued run then equals
an uninterrupted one.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from data.records import CaseRecord
from experiments.metrics.counterfact import retention_summary
from experiments.pipeline.export import save_run_model
from experiments.pipeline.run_config import RunOptions
from experiments.pipeline.resume import continue_session
from experiments.pipeline.session import Session, new_session
from experiments.reporting.plots import write_plots
from experiments.reporting.summary import write_summary
from rome.editor import EditResult
from util.deltas import restore
from util.errors import RunError
from util.models import LoadedModel
from util.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOutcome:
    disabling: bool
    evaluated: bool  # the periodic evaluation ran (a checkpoint follows)
    collapse: str | None  # why the model counts as collapsed at this evaluation (--stop_on_perplexity), else None
    efficacy: float | None  # ES of the batch just edited, for the progress bar
    delta_norm: float


def run(options: RunOptions, lm: LoadedModel | None = None, hparams: Any = None) -> Path:
    """Run (or continue) one evaluation and return its folder. `lm`/`hparams` given replace
    loading them from options.model_name / the hparams file."""
    session = (continue_session if options.continue_from_run else new_session)(options, lm, hparams)
    try:
        with logging_redirect_tqdm():
            execute(session)
    finally:
        session.folder.close()
        session.ctx.close()  # what value optimisation registered in transformers
    return session.folder.path


def execute(s: Session) -> None:
    if s.status in ("complete", "collapsed"):
        log.info("%s is already finished (%s); rewriting its summary", s.folder.path, s.status)
        finish(s)
        return
    s.status = "running"
    stop_at = s.n_edits + s.options.stop_after if s.options.stop_after else None
    if s.baseline_done:  # continued: say in the checkpoint that lines may now follow it (see RunFolder.verify)
        save_checkpoint(s)
    else:
        guarded(s, baseline)
        save_checkpoint(s)
    bar = progress(total=len(s.cases), initial=s.n_edits, unit="edit", desc=f"{s.options.alg_name} {s.options.mode}")
    try:
        while s.position < s.n_batches:
            before = s.n_edits
            outcome = guarded(s, process_batch)
            bar.update(s.n_edits - before)
            bar.set_postfix(ES=outcome.efficacy, dnorm=f"{outcome.delta_norm:.3g}", refresh=False)
            if outcome.disabling and s.options.stop_on_collapse:
                s.status = "collapsed"
                log.warning("stopping after a disabling edit (--stop_on_collapse) at %d edits", s.n_edits)
                break
            if outcome.collapse:
                s.status = "collapsed"
                log.warning("stopping at %d edits (--stop_on_perplexity): %s", s.n_edits, outcome.collapse)
                break
            if stop_at is not None and s.n_edits >= stop_at and s.position < s.n_batches:
                s.status = "paused"
                log.info("paused after %d edits (--stop_after); %s", s.n_edits, continue_hint(s))
                break
            if outcome.evaluated:
                save_checkpoint(s)
        else:
            s.status = "complete"
    finally:
        bar.close()
    save_checkpoint(s)
    finish(s)


def guarded(s: Session, step: Callable[[Session], Any]) -> Any:
    """Run one step; on Ctrl-C roll back to its start, checkpoint and summarise, re-raise."""
    mark = s.mark()
    try:
        return step(s)
    except KeyboardInterrupt:
        s.rollback(mark)
        s.status = "interrupted"
        save_checkpoint(s)
        finish(s)
        log.warning("interrupted: checkpoint after %d of %d edits in %s; %s", s.n_edits, len(s.cases), s.folder.path, continue_hint(s))
        raise


def continue_hint(s: Session) -> str:
    """How to continue the session's run (its folder's path holds the algorithm and results root)."""
    return f"continue with: python experiments/evaluate.py --continue_from_run {s.folder.path}"


def save_checkpoint(s: Session) -> None:
    s.folder.save_checkpoint(s.checkpoint())


def finish(s: Session) -> None:
    write_summary(s.folder.path, s.status)
    write_plots(s.folder.path)
    if s.options.save_model and s.status in ("complete", "paused", "collapsed"):
        log.info("edited model written to %s", save_run_model(s.lm, s.folder.path, s.n_edits))


def baseline(s: Session) -> None:
    """Before the first edit: probes, perplexity and the pre-edit generation fluency."""
    log.info("before the first edit: probes %s, perplexity, generation", ",".join(s.options.downstream_tasks) or "none")
    s.health.baseline_perplexity = write_periodic(s, n_edits=0, retention=None)
    if s.options.generation_test_interval:
        row = s.suite.generation_row(s.cases, 0)
        s.folder.streams["probes"].write(row)
        s.health.baseline_fluency = row["fluency"]
    s.baseline_done = True


def apply_edits(s: Session, records: list[CaseRecord]) -> EditResult:
    """The editor call (its own function so tests can interrupt it)."""
    return s.algorithm.apply(s.lm, [r.request for r in records], s.hparams, s.ctx)


def check_declared(s: Session, result: EditResult) -> None:
    """An edit may change only the parameters its editor declares (Editor.edits): those are the ones
    restored, checkpointed, measured and exported."""
    undeclared = [name for name in result.deltas if name not in s.weights0]
    if undeclared:
        raise RunError(f"{s.algorithm.name} changed {undeclared[0]}, which it does not declare among the parameters it "
                       f"edits ({', '.join(s.weights0)}): fix its Editor.edits (rome/declaration.py)")


def crossed(before: int, after: int, interval: int) -> bool:
    return interval > 0 and after // interval > before // interval


def process_batch(s: Session) -> BatchOutcome:
    index, records, options = s.position, s.batch(s.position), s.options
    before, after = s.n_edits, s.n_edits + len(records)
    torch.manual_seed(options.seed * 1_000_003 + index)  # nothing should draw from it; if it does, per position
    start = time.perf_counter()
    result = apply_edits(s, records)
    check_declared(s, result)
    edit_seconds = time.perf_counter() - start
    health = s.health.measure(s.lm.model, result.deltas, s.weights0)
    start = time.perf_counter()
    current, results = s.suite.counterfact(records)
    generation = None
    last = after == len(s.cases)
    if crossed(before, after, options.generation_test_interval) or (options.generation_test_interval and last):
        # Under a protocol that scores generation over every edited fact (alphaedit), the last one does.
        every = last and s.suite.protocol.final_generation_all
        generation = s.suite.generation_row(s.applied(index)[::-1], after, every_prompt=every)
        s.folder.streams["probes"].write(generation)
    reasons = s.health.reasons(health["delta_norm"], generation["fluency"] if generation else None)
    s.health.record(health["delta_norm"])
    for result_case in results:
        s.folder.streams["cases"].write({"phase": "current", "n_edits": after, "batch": index, **result_case.to_dict()})
    s.folder.streams["edits"].write({
        "batch": index, "n_edits": after, "case_ids": [r.case_id for r in records], "current": current,
        "health": health, "disabling": reasons,
        "generation": {k: generation[k] for k in ("fluency", "consistency")} if generation else None,
        "requests": result.requests, "layers": result.layers,
        "seconds": {"edit": edit_seconds, "evaluate": time.perf_counter() - start},
    })
    s.n_edits = after
    final = after == len(s.cases) or (bool(reasons) and options.stop_on_collapse)
    evaluated = crossed(before, after, options.downstream_eval_steps) or final
    collapse = None
    if evaluated:
        perplexity = write_periodic(s, after, retention=index, final=after == len(s.cases))
        collapse = s.health.perplexity_collapse(perplexity, options.stop_on_perplexity)
    if not options.sequential:  # independent batches: back to the original model
        restore(s.lm.model, s.weights0)
        s.ctx.state.clear()
    s.position = index + 1
    return BatchOutcome(bool(reasons), evaluated, collapse, current["ES"], health["delta_norm"])


def write_periodic(s: Session, n_edits: int, retention: int | None, final: bool = False) -> float | None:
    """Retention after batch `retention` (None: before editing) over the facts Session.retained
    names (a sample of those in the model, or all of them), the known-facts probe, the downstream
    probes and perplexity, into probes.jsonl (and cases.jsonl per fact). Returns the perplexity
    (None when not measured)."""
    probes = s.folder.streams["probes"]
    if retention is not None:
        scored = s.retained(retention, final)
        in_model = len(s.applied(retention))
        scope = "all" if len(scored) == in_model else "sample"
        log.info("evaluation after %d edits: retention over %d of the %d facts in the model, probes, perplexity",
                 n_edits, len(scored), in_model)
        start = time.perf_counter()
        summary, results = s.suite.counterfact(scored)
        for result_case in results:
            s.folder.streams["cases"].write({"phase": "retention", "n_edits": n_edits, "case_id": result_case.case_id,
                                             "metrics": result_case.to_dict()["metrics"]})
        latest = [r.case_id for r in s.batch(retention)]
        summary = {"protocol": summary["protocol"], **retention_summary(
            [r.metrics() for r in results], [r.case_id for r in results], latest, in_model)}
        probes.write({"kind": "retention", "n_edits": n_edits, "scope": scope, "facts_in_model": in_model, **summary,
                      "seconds": time.perf_counter() - start})
    perplexity = s.suite.perplexity_row(n_edits)
    for row in (s.suite.known_row(n_edits), *s.suite.probe_rows(n_edits), perplexity):
        if row is not None:
            probes.write(row)
    return perplexity["perplexity"] if perplexity else None
