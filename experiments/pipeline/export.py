"""Write a run's edited model as a Hugging Face folder (safetensors, config, tokenizer); the
command line is experiments/export.py.

The base model named in the run's config.json is loaded in the run's dtype, checked against the
matrices the run started from (weights0_sha256), and given the edited matrices of the run's
checkpoint: the last one, or with --at N the checkpoint after N edits (a run folder keeps only its
latest checkpoint, so pause a run there with --stop_after to export an intermediate model). The
checkpoint's weight file is checked before anything is written: its size and SHA-256 against the
checkpoint's manifest, and each edited matrix present, of the model's shape and finite. The folder
loads with AutoModelForCausalLM.from_pretrained(DIR) and holds kedit_export.json saying which
run, edits and hparams produced it. It is written under a temporary name and renamed into place,
so an interruption (SIGTERM, a full disk) leaves no half folder. evaluate.py --save_model does the
same at the end of a run.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from experiments.pipeline.checkpoint import RunFolder
from util.checks import checked_tensor, read_tensors
from util.deltas import digest, restore, snapshot
from util.errors import RunError
from util.files import atomic_write_json, writing
from util.models import LoadedModel, load_model
from util.paths import CHECKPOINT_STATE, sha256_file

log = logging.getLogger(__name__)

EXPORT_INFO = "kedit_export.json"
# weights_<edits>_<batches>_<first 12 hex digits of its SHA-256>.safetensors (no digest before manifests)
WEIGHTS = re.compile(r"weights_(\d+)_(\d+)(?:_([0-9a-f]{12}))?\.safetensors$")
NOT_EXPORTED = "nothing was exported"


def checkpoint_weights(run: Path, at: int | None = None) -> tuple[Path, int]:
    """The checkpoint's weight file after `at` edits (default: the latest) and its edit count,
    checked against the checkpoint's manifest (or, for a file it does not name, the SHA-256
    prefix in the file's name)."""
    folder = RunFolder(run)
    state = folder.checkpoints / CHECKPOINT_STATE
    if not state.is_file():
        raise RunError(f"{run}: no checkpoint ({state} does not exist)")
    latest = folder.committed(NOT_EXPORTED)
    if at is None or at == latest["n_edits"]:
        return folder.verify_file(latest, latest["files"]["weights"], NOT_EXPORTED), latest["n_edits"]
    found = {int(m.group(1)): (p, m.group(3)) for p in folder.checkpoints.iterdir() if (m := WEIGHTS.match(p.name))}
    if at not in found:
        raise RunError(f"{run}: no checkpoint after {at} edits (it keeps those after {sorted(found)}); "
                       f"pause a run there with --stop_after to export it")
    path, prefix = found[at]
    if prefix and not sha256_file(path).startswith(prefix):
        raise RunError(f"{path} differs from the SHA-256 in its name: {NOT_EXPORTED}")
    return path, at


def edited_weights(lm: LoadedModel, weights_file: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The edited matrices of a checkpoint file, each present, of the model's shape and finite."""
    tensors = read_tensors(weights_file, RunError, NOT_EXPORTED)
    return {name: checked_tensor(tensors, name, tuple(lm.model.get_parameter(name).shape), weights_file, RunError)
            for name in names}


def save_model_folder(lm: LoadedModel, out: str | Path, info: dict[str, Any]) -> Path:
    """model.save_pretrained + tokenizer + kedit_export.json (provenance) into `out`, written under
    a temporary name beside it and renamed into place. An existing `out` is replaced only when it
    holds an export of the same run and edit count (a run finished again); any other refuses."""
    out = Path(out)
    check_replaceable(out, info)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(tmp, f"{NOT_EXPORTED} to {out}"):
            tmp.mkdir(parents=True)
            lm.model.save_pretrained(tmp, safe_serialization=True)
            lm.tok.save_pretrained(tmp)
        atomic_write_json(tmp / EXPORT_INFO, info)
        with writing(out, f"{NOT_EXPORTED} to {out}"):
            replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_replaceable(out: Path, info: dict[str, Any]) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        existing = json.loads((out / EXPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RunError(f"{out} exists and is not an exported model (no readable {EXPORT_INFO}): "
                       f"choose another --out or remove it") from None
    if not isinstance(existing, dict) or (existing.get("run"), existing.get("n_edits")) != (info.get("run"), info.get("n_edits")):
        raise RunError(f"{out} holds another export ({EXPORT_INFO}: run {existing.get('run') if isinstance(existing, dict) else '?'}, "
                       f"{existing.get('n_edits') if isinstance(existing, dict) else '?'} edits): choose another --out or remove it")


def replace_folder(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and removed after."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def provenance(run: Path, config: dict[str, Any], n_edits: int) -> dict[str, Any]:
    keys = ("alg_name", "mode", "batch_size", "seed", "model", "hparams", "git_commit", "weights0_sha256")
    return {"run": str(run.resolve()), "n_edits": n_edits, **{k: config.get(k) for k in keys}}


def save_run_model(lm: LoadedModel, run: Path, n_edits: int, out: str | Path | None = None) -> Path:
    """`lm`, holding `run`'s edits after `n_edits`, into `out` (default <run>/model_<n_edits>);
    evaluate.py --save_model calls it with the model in memory at the end of a session."""
    config = RunFolder(run).read_config()
    out = Path(out) if out else run / f"model_{n_edits:06d}"
    try:
        return save_model_folder(lm, out, provenance(run, config, n_edits))
    except KeyboardInterrupt:
        log.warning("interrupted while writing %s: nothing of it was kept; write it with: python experiments/export.py %s",
                    out, run)
        raise


def export_run(run: str | Path, out: str | Path | None = None, at: int | None = None,
               lm: LoadedModel | None = None, device: str = "cpu", model_cache: Path | None = None) -> Path:
    """The edited model of `run` (after `at` edits, default the last checkpoint) as a HF folder
    at `out` (default <run>/model_<n edits>). `lm`: the base model, else loaded by config name on
    `device`, with `model_cache` (Caches.models) holding dequantised embedded models."""
    if lm is None and model_cache is None:
        raise TypeError("export_run: give the base model (lm) or the model cache folder to load it with (model_cache)")
    run = Path(run)
    if not (run / "config.json").is_file():
        raise RunError(f"{run}: not a run folder (no config.json)")
    config = RunFolder(run).read_config()
    if config["mode"] == "batched":
        raise RunError(f"{run}: a batched run undoes every batch; only sequential runs leave an edited model")
    weights_file, n_edits = checkpoint_weights(run, at)
    lm = lm or load_model(config["model"], config["options"]["dtype"], device, model_cache=model_cache)
    names = config["edited_params"]
    if digest(snapshot(lm.model, names)) != config["weights0_sha256"]:
        raise RunError(f"{run}: the loaded model's edited matrices differ from those the run started from ({config['model']})")
    restore(lm.model, edited_weights(lm, weights_file, names))
    return save_run_model(lm, run, n_edits, out)
