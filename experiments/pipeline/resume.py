"""Continuing a run: which options it continues with, the checks that it is the same run, and
its state put back from the last checkpoint.

    python experiments/evaluate.py --continue_from_run run_NNN [--stop_after N] [--device cuda]

The stored options are reused; a flag given now replaces its stored value, and one that defines
the results (RunOptions.differences) must then equal it. A continued run equals an uninterrupted
one: the checkpoint restores the edited matrices, the editor's state, the health history and the
stream sizes (lines a crashed session wrote after its checkpoint are cut).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from experiments.pipeline.checkpoint import Checkpoint, RunFolder
from experiments.pipeline.run_config import RunOptions
from experiments.pipeline.session import Session, begin, context_state, prepare
from util.deltas import restore
from util.errors import RunError
from util.models import LoadedModel

log = logging.getLogger(__name__)

# Taken from this invocation even when not given: where the run is, what this session does before
# it ends (a stored --stop_after or --save_model must not carry over) and its environment variables.
THIS_INVOCATION = ("continue_from_run", "results_dir", "stop_after", "save_model", "environment")


def stored_options(config: dict[str, Any]) -> RunOptions:
    """The options a run folder's config.json holds. Runs from before the command line put
    $KEDIT_CORPUS into the options recorded the corpus they used only under "corpus"."""
    options = RunOptions.from_dict(config["options"])
    if options.corpus is None and config.get("corpus"):
        options = dataclasses.replace(options, corpus=config["corpus"]["path"])
    return options


def continued_options(now: RunOptions, given: set[str]) -> RunOptions:
    """The stored options of the run `now.continue_from_run`, with the fields named in `given`
    (those set on the command line) and THIS_INVOCATION's taken from `now`."""
    folder = RunFolder.existing(now.results_dir, now.alg_name, now.continue_from_run)
    stored = stored_options(folder.read_config())
    return dataclasses.replace(stored, **{name: getattr(now, name) for name in set(THIS_INVOCATION) | given})


def continue_session(options: RunOptions, lm: LoadedModel | None = None, hparams: Any = None) -> Session:
    """The run named by options.continue_from_run at its last checkpoint, locked for this process."""
    options.validate()
    folder = RunFolder.existing(options.results_dir, options.alg_name, options.continue_from_run)
    folder.lock()  # before reading anything: another process may be writing the run
    try:
        stored = folder.read_config()
        committed = folder.verify()  # a damaged checkpoint ends here, before any file is touched
        prepared = prepare(options, lm, hparams, stored, folder.path)
        check_continuable(options, stored, prepared.config, folder.path)
        session = prepared.session(options, folder)
        folder.open_streams()
        load_checkpoint(session, folder.load_checkpoint(committed))
        return begin(session)
    except BaseException:
        folder.close()
        raise


def check_continuable(options: RunOptions, stored: dict[str, Any], config: dict[str, Any], where: Path) -> None:
    """A continued run must be the same run: options, data and starting weights."""
    changed = options.differences(stored_options(stored))
    if changed:
        raise RunError(f"{where} was run with different {', '.join(changed)}; continue it with the stored values or start a new run")
    if set(config["data"]) != set(stored["data"]):
        raise RunError(f"{where}: data files {sorted(stored['data'])} at the start, {sorted(config['data'])} now")
    for name, entry in config["data"].items():
        if stored["data"][name]["sha256"] != entry["sha256"]:
            raise RunError(f"{where}: data file '{name}' ({entry['path']}) differs from the one the run started with")
    if stored["weights0_sha256"] != config["weights0_sha256"]:
        raise RunError(f"{where}: the model's edited matrices differ from those the run started with ({stored['model']})")


def load_checkpoint(session: Session, ckpt: Checkpoint) -> None:
    """The session's weights, editor state, health, position and streams as the checkpoint has them."""
    restore(session.lm.model, ckpt.weights)
    session.ctx.state = context_state(ckpt)
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
