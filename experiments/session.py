"""Everything one run works with, opened new or restored from a run folder's last checkpoint.

Inputs that can fail (options, hparams, cases, probe sets, the model) are loaded before a run
folder is created, so a typo never leaves an empty results/<ALG>/run_NNN behind.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from data.cases import NO_OP, case_file, select_cases
from data.records import CaseRecord
from experiments.checkpoint import Checkpoint, RunFolder, atomic_write_json
from experiments.evals import EvalSuite
from experiments.health import UpdateHealth
from experiments.run_config import RunError, RunOptions, git_commit
from rome.editor import EditContext
from rome.hparams import EditHyperParams
from editors import Algorithm, algorithm, load_algorithm_hparams
from util.corpus import local_corpus
from util.hparams import build_hparams, to_dict
from util.models import LoadedModel, load_model
from util.paths import sha256_file
from util.state import state_from_tensors, state_to_tensors

log = logging.getLogger(__name__)


@dataclass
class Session:
    options: RunOptions
    lm: LoadedModel
    hparams: EditHyperParams
    algorithm: Algorithm
    cases: list[CaseRecord]
    folder: RunFolder
    suite: EvalSuite
    ctx: EditContext
    health: UpdateHealth
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

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: self.lm.model.get_parameter(name).detach().clone() for name in self.health.names}

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
        load_weights(self.lm.model, mark["weights"])
        self.ctx.state = mark["context"]
        self.health.load_state_dict(mark["health"])
        self.folder.cut_streams(mark["sizes"])
        self.position, self.n_edits, self.baseline_done = mark["position"], mark["n_edits"], mark["baseline_done"]


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for name, value in weights.items():
        model.get_parameter(name).copy_(value)


def split_context_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """EditContext.state as (tensors for safetensors, plain JSON values); see util/state.py."""
    try:
        return state_to_tensors(state)
    except (TypeError, ValueError) as err:
        raise RunError(f"EditContext.state cannot be checkpointed: {err}") from None


def build_config(options: RunOptions, hparams: EditHyperParams, lm: LoadedModel, health: UpdateHealth, files: dict[str, str], n_cases: int) -> dict[str, Any]:
    corpus = options.corpus or os.environ.get("KEDIT_CORPUS")
    return {
        "alg_name": options.alg_name, "mode": options.mode, "batch_size": options.num_edits, "seed": options.seed,
        "model": lm.name, "model_type": lm.model.config.model_type, "n_cases": n_cases,
        "options": options.to_dict(), "hparams_class": type(hparams).__name__, "hparams": to_dict(hparams),
        "git_commit": git_commit(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "data": {name: {"path": str(path), "sha256": sha256_file(path)} for name, path in files.items()},
        "corpus": {"path": corpus, "ident": local_corpus(corpus).ident} if corpus else None,
        "edited_params": health.names, "weights0_sha256": health.digest(),
    }


def check_continuable(options: RunOptions, stored: dict[str, Any], config: dict[str, Any], where: Path) -> None:
    """A continued run must be the same run: options, data and starting weights."""
    changed = options.differences(RunOptions.from_dict(stored["options"]))
    if changed:
        raise RunError(f"{where} was run with different {', '.join(changed)}; continue it with the stored values or start a new run")
    if set(config["data"]) != set(stored["data"]):
        raise RunError(f"{where}: data files {sorted(stored['data'])} at the start, {sorted(config['data'])} now")
    for name, entry in config["data"].items():
        if stored["data"][name]["sha256"] != entry["sha256"]:
            raise RunError(f"{where}: data file '{name}' ({entry['path']}) differs from the one the run started with")
    if stored["weights0_sha256"] != config["weights0_sha256"]:
        raise RunError(f"{where}: the model's edited matrices differ from those the run started with ({stored['model']})")


def resolve_hparams(options: RunOptions, hparams: EditHyperParams | None, stored: dict[str, Any] | None, where: Path | None) -> EditHyperParams:
    alg = algorithm(options.alg_name)
    if stored is not None:  # the stored values, not the file, which may have changed since
        hparams = build_hparams(alg.hparams_class, stored["hparams"], f"{where}/config.json")
    elif hparams is None:
        hparams = load_algorithm_hparams(options.alg_name, options.hparams_file, options.overrides)
    if not isinstance(hparams, alg.hparams_class):
        raise RunError(f"{options.alg_name} takes {alg.hparams_class.__name__}, got {type(hparams).__name__}")
    return hparams


def open_session(options: RunOptions, lm: LoadedModel | None = None, hparams: EditHyperParams | None = None) -> Session:
    """A new run (folder and config.json), or the run named by options.continue_from_run at its
    last checkpoint. `lm`/`hparams` given (tests, notebooks) replace loading them."""
    options.validate()
    if not options.continue_from_run:
        return start_session(options, lm, hparams, None, None)
    folder = RunFolder.existing(options.results_dir, options.alg_name, options.continue_from_run)
    folder.lock()  # before reading anything: another process may be writing the run
    try:
        stored = folder.read_config()
        committed = folder.verify()  # a damaged checkpoint ends here, before any file is touched
        return start_session(options, lm, hparams, folder, (stored, committed))
    except BaseException:
        folder.close()
        raise


def start_session(options: RunOptions, lm: LoadedModel | None, hparams: EditHyperParams | None,
                  folder: RunFolder | None, continued: tuple[dict[str, Any], dict[str, Any]] | None) -> Session:
    stored, committed = continued if continued else (None, None)
    hparams = resolve_hparams(options, hparams, stored, folder.path if folder else None)
    selection = select_cases(options.ds_name, options.data_dir, options.dataset_size_limit, options.custom_path)
    cases = selection.cases
    lm = lm or load_model(options.model_name, options.dtype, options.device)
    hparams.check_model(lm.model.config.num_hidden_layers)
    suite = EvalSuite(lm, options)
    health = UpdateHealth(lm.model, [lm.arch.weight_name(layer) for layer in hparams.layers], options.health)
    files = {"cases": str(case_file(options.ds_name, options.data_dir, options.custom_path)), **suite.data_files()}
    config = build_config(options, hparams, lm, health, files, len(cases))
    config["skipped_cases"] = {"reason": NO_OP, "case_ids": selection.skipped}
    ctx = prepared_context(options, lm, hparams)
    if stored is None:
        folder = RunFolder.create(options.results_dir, options.alg_name)
        try:
            atomic_write_json(folder.file("config.json"), config)
        except BaseException:
            folder.close()
            raise
        log.info("run folder %s", folder.path)
    else:
        check_continuable(options, stored, config, folder.path)
    session = Session(options, lm, hparams, algorithm(options.alg_name), cases, folder, suite, ctx, health)
    folder.open_streams()
    if committed is not None:
        restore(session, folder.load_checkpoint(committed))
    session.sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "at_edits": session.n_edits, "device": options.device})
    return session


def prepared_context(options: RunOptions, lm: LoadedModel, hparams: EditHyperParams) -> EditContext:
    """An EditContext whose templates and key statistics come from the unedited model: computed
    lazily at the first edit they would be, but a continued run restores edited weights first."""
    ctx = EditContext(seed=options.seed, corpus_path=options.corpus, value_dtype=options.value_dtype,
                      value_compile=options.value_compile, max_gpu_memory=options.max_gpu_memory)
    ctx.templates(lm, hparams)
    if hparams.mom2_adjustment:
        ctx.moments(lm, hparams)  # C0 (host); its device copies follow at the first edit, only where solved with
    return ctx


def restore(session: Session, ckpt: Checkpoint) -> None:
    load_weights(session.lm.model, ckpt.weights)
    session.ctx.state = state_from_tensors(ckpt.context, ckpt.state["context_values"])
    session.health.load_state_dict(ckpt.state["health"])
    session.position, session.n_edits = ckpt.position, ckpt.n_edits
    session.status, session.baseline_done = ckpt.state["status"], ckpt.state["baseline_done"]
    session.sessions = ckpt.state["sessions"]
    cut = {name: size - ckpt.sizes.get(name, 0) for name, size in session.folder.sizes().items() if size > ckpt.sizes.get(name, 0)}
    if cut:  # lines of a session that crashed after the checkpoint (verify() allows them only then)
        log.warning("dropping lines written after the checkpoint by a session that did not end cleanly: %s",
                    ", ".join(f"{name}.jsonl {n} bytes" for name, n in cut.items()))
    session.folder.cut_streams(ckpt.sizes)
    log.info("continuing %s after %d edits (%d batches)", session.folder.path, ckpt.n_edits, ckpt.position)
