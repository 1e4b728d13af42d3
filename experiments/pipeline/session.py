"""Everything one run works with: its inputs loaded (hparams, cases, probe sets, the model), the
edited matrices' original values W0, an EditContext and the run folder. Opening a new run is here;
continuing one from its last checkpoint is experiments/pipeline/resume.py.

Inputs that can fail (options, hparams, cases, probe sets, the model) are loaded before a run
folder is created, so a typo never leaves an empty results/<ALG>/run_NNN behind.
"""
from __future__ import annotations

import copy
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from data.cases import NO_OP, dataset_for, select_cases
from data.records import CaseRecord
from editors import algorithm, hparams_path, load_algorithm_hparams
from experiments.pipeline.checkpoint import Checkpoint, RunFolder
from experiments.pipeline.evals import EvalSuite
from experiments.pipeline.health import UpdateHealth
from experiments.pipeline.run_config import RunOptions, git_commit
from rome.declaration import Editor
from rome.editor import EditContext
from util.corpus import local_corpus
from util.deltas import digest, restore, snapshot
from util.errors import RunError
from util.files import atomic_write_json
from util.hparams import build_hparams, to_dict
from util.models import LoadedModel, load_model
from util.paths import sha256_file
from util.sampling import seeded_sample
from util.state import state_from_tensors, state_to_tensors

log = logging.getLogger(__name__)


@dataclass
class Session:
    options: RunOptions
    lm: LoadedModel
    hparams: Any  # the editor's hparams class
    algorithm: Editor
    cases: list[CaseRecord]
    folder: RunFolder
    suite: EvalSuite
    ctx: EditContext
    health: UpdateHealth
    # W0 of the parameters the editor edits (Editor.edited_params): drift is measured from it,
    # batched runs and rollbacks return to it, checkpoints and exports hold these parameters
    weights0: dict[str, torch.Tensor]
    retention_ids: frozenset | None = None  # the case ids of the retention sample (None: every fact in the model)
    position: int = 0  # batches done
    n_edits: int = 0
    status: str = "new"  # new | running | paused | interrupted | collapsed | complete
    baseline_done: bool = False
    sessions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.options.num_edits

    @property
    def n_batches(self) -> int:
        return math.ceil(len(self.cases) / self.batch_size)

    def batch(self, index: int) -> list[CaseRecord]:
        return self.cases[index * self.batch_size : (index + 1) * self.batch_size]

    def applied(self, index: int) -> list[CaseRecord]:
        """The facts in the model after batch `index`: all so far, or the batch alone when
        batches are independent (batched mode restores W0 after each)."""
        return self.cases[: (index + 1) * self.batch_size] if self.options.sequential else self.batch(index)

    def retained(self, index: int, final: bool = False) -> list[CaseRecord]:
        """The facts whose retention is scored after batch `index`: the sampled ones edited so far
        and the batch itself (every fact in the model without a sample, or at the `final`
        evaluation with --retention_all_at_end)."""
        applied = self.applied(index)
        if self.retention_ids is None or (final and self.options.retention_all_at_end):
            return applied
        latest = {r.case_id for r in self.batch(index)}
        return [r for r in applied if r.case_id in self.retention_ids or r.case_id in latest]

    def weights(self) -> dict[str, torch.Tensor]:
        return snapshot(self.lm.model, self.weights0)

    def checkpoint(self) -> Checkpoint:
        tensors, values = split_context_state(self.ctx.state)
        state = {"status": self.status, "baseline_done": self.baseline_done, "health": self.health.state_dict(),
                 "context_values": values, "sessions": self.sessions}
        return Checkpoint(self.position, self.n_edits, self.folder.sizes(), self.weights(), tensors, state)

    def mark(self) -> dict[str, Any]:
        """A consistent point to roll back to (Ctrl-C in the middle of a batch)."""
        return {"position": self.position, "n_edits": self.n_edits, "sizes": self.folder.sizes(),
                "weights": self.weights(), "context": copy.deepcopy(self.ctx.state),
                "health": copy.deepcopy(self.health.state_dict()), "baseline_done": self.baseline_done}

    def rollback(self, mark: dict[str, Any]) -> None:
        restore(self.lm.model, mark["weights"])
        self.ctx.state = mark["context"]
        self.health.load_state_dict(mark["health"])
        self.folder.cut_streams(mark["sizes"])
        self.position, self.n_edits, self.baseline_done = mark["position"], mark["n_edits"], mark["baseline_done"]


def split_context_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """EditContext.state as (tensors for safetensors, plain JSON values); see util/state.py."""
    try:
        return state_to_tensors(state)
    except (TypeError, ValueError) as err:
        raise RunError(f"EditContext.state cannot be checkpointed: {err}") from None


def context_state(ckpt: Checkpoint) -> dict[str, Any]:
    """The EditContext.state a checkpoint holds (the inverse of split_context_state, as Session.checkpoint stores it)."""
    return state_from_tensors(ckpt.context, ckpt.state["context_values"])


def build_config(options: RunOptions, hparams: Any, lm: LoadedModel, weights0: dict[str, torch.Tensor],
                 files: dict[str, str], n_cases: int) -> dict[str, Any]:
    corpus = options.corpus  # $KEDIT_CORPUS too: the command line put it there
    return {
        "alg_name": options.alg_name, "mode": options.mode, "batch_size": options.num_edits, "seed": options.seed,
        "model": lm.name, "model_type": lm.model.config.model_type, "n_cases": n_cases,
        "options": options.to_dict(), "hparams_class": type(hparams).__name__, "hparams": to_dict(hparams),
        "git_commit": git_commit(options.environment.git_sha), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "data": {name: {"path": str(path), "sha256": sha256_file(path)} for name, path in files.items()},
        "corpus": {"path": corpus, "ident": local_corpus(corpus, options.environment.caches).ident} if corpus else None,
        "edited_params": list(weights0), "weights0_sha256": digest(weights0),
    }


def resolve_hparams(options: RunOptions, hparams: Any, stored: dict[str, Any] | None, where: Path | None) -> Any:
    alg = algorithm(options.alg_name)
    if stored is not None:  # the stored values, not the file, which may have changed since
        hparams = build_hparams(alg.hparams_class, stored["hparams"], f"{where}/config.json", alg.fixed)
    elif hparams is None:
        hparams = load_algorithm_hparams(options.alg_name, options.hparams_file, options.overrides)
    if not alg.takes(hparams):  # the class, and the values the editor fixes (ROME's original_implementation)
        wanted = alg.hparams_class.__name__ + "".join(f" with {k}={v!r}" for k, v in alg.fixed.items())
        got = type(hparams).__name__ + "".join(f" with {k}={getattr(hparams, k, None)!r}" for k in alg.fixed)
        raise RunError(f"{options.alg_name} takes {wanted}, got {got}")
    return hparams


@dataclass(frozen=True)
class Prepared:
    """A run's inputs, loaded and checked, before any file of the run folder is touched."""

    hparams: Any
    cases: list[CaseRecord]
    lm: LoadedModel
    suite: EvalSuite
    health: UpdateHealth
    weights0: dict[str, torch.Tensor]
    ctx: EditContext
    config: dict[str, Any]  # what config.json holds for these inputs

    retention_ids: frozenset | None = None

    def session(self, options: RunOptions, folder: RunFolder) -> Session:
        return Session(options, self.lm, self.hparams, algorithm(options.alg_name), self.cases, folder, self.suite,
                       self.ctx, self.health, self.weights0, self.retention_ids)


def retention_sample(cases: list[CaseRecord], options: RunOptions) -> frozenset | None:
    """The case ids scored for retention at every evaluation point once edited: a seeded sample
    of options.retention_sample of the run's cases (None: every edited fact, which a batched run,
    whose model holds one batch at a time, always scores)."""
    n = options.retention_sample
    if not options.sequential or n == 0 or n >= len(cases):
        return None
    return frozenset(case.case_id for case in seeded_sample(cases, n, options.seed))


def prepare(options: RunOptions, lm: LoadedModel | None, hparams: Any,
            stored: dict[str, Any] | None = None, where: Path | None = None) -> Prepared:
    """Load and check what the options name; `stored` (a continued run's config.json at `where`)
    supplies the hparams. The parameters the editor edits are read (W0) before anything edits them."""
    given = hparams is not None
    hparams = resolve_hparams(options, hparams, stored, where)
    alg = algorithm(options.alg_name)
    selection = select_cases(options.ds_name, options.data_dir, options.dataset_size_limit, options.custom_path, options.environment)
    lm = lm or load_model(options.model_name, options.dtype, options.device, model_cache=options.environment.caches.models)
    source = (f"{where}/config.json" if stored is not None else "hparams" if given
              else str(hparams_path(options.alg_name, options.hparams_file)))
    hparams.check_model(lm.model.config.num_hidden_layers, f"{source} (used with {lm.name})")
    suite = EvalSuite(lm, options, [case.request.subject for case in selection.cases])
    weights0 = snapshot(lm.model, alg.edited_params(lm, hparams))
    files = {**{name: str(path) for name, path in selection.files.items()}, **suite.data_files()}
    config = build_config(options, hparams, lm, weights0, files, len(selection.cases))
    config["skipped_cases"] = {"reason": NO_OP, "case_ids": selection.skipped}
    sample = retention_sample(selection.cases, options)
    config["retention"] = {
        "scope": "all" if sample is None else "sample", "sample_size": None if sample is None else len(sample),
        "all_at_end": options.retention_all_at_end,
        "case_ids": None if sample is None else [c.case_id for c in selection.cases if c.case_id in sample],
    }
    config["known_facts"] = suite.known_config()
    config["dataset"] = {"name": options.ds_name, "measures": dataset_for(options.ds_name).measures}
    ctx = prepared_context(options, lm, hparams, alg)
    health = UpdateHealth(list(weights0), options.health)
    return Prepared(hparams, selection.cases, lm, suite, health, weights0, ctx, config, sample)


def begin(session: Session) -> Session:
    """Record this process in the run's list of sessions (its streams are open), with the commit of
    its code: a run done in parts may run each part on other code (the summary lists them)."""
    session.sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "at_edits": session.n_edits,
                             "device": session.options.device, "git_commit": git_commit(session.options.environment.git_sha)})
    return session


def new_session(options: RunOptions, lm: LoadedModel | None = None, hparams: Any = None) -> Session:
    """A new numbered run folder with its config.json. `lm`/`hparams` given (tests, notebooks)
    replace loading them."""
    prepared = prepare(options.validate(), lm, hparams)
    folder = RunFolder.create(options.results_dir, options.alg_name)
    try:
        atomic_write_json(folder.file("config.json"), prepared.config)
    except BaseException:
        folder.close()
        raise
    log.info("run folder %s", folder.path)
    folder.open_streams()
    return begin(prepared.session(options, folder))


def prepared_context(options: RunOptions, lm: LoadedModel, hparams: Any, alg: Editor) -> EditContext:
    """An EditContext holding what the editor needs from the unedited model (Editor.prepare: the
    templates and key statistics of the closed-form editors): computed lazily at the first edit
    they would be, but a continued run restores edited weights first."""
    env = options.environment
    ctx = EditContext(env.caches, seed=options.seed, corpus_path=options.corpus, offline=env.offline, value_dtype=options.value_dtype,
                      value_compile=options.value_compile, max_gpu_memory=options.max_gpu_memory, value_cache=options.value_cache)
    if alg.prepare is not None:
        alg.prepare(lm, hparams, ctx)
    return ctx
