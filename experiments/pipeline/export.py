"""Write a run's edited model as a Hugging Face folder (safetensors, config, tokenizer); the
command line is experiments/export.py.

The base model named in the run's config.json is loaded in the run's dtype, checked against the
matrices the run started from (weights0_sha256), and given the edited matrices of the run's
checkpoint: the last one, or with --at N the checkpoint after N edits (a run folder keeps only its
latest checkpoint, so pause a run there with --stop_after to export an intermediate model). The
folder loads with AutoModelForCausalLM.from_pretrained(DIR) and holds kedit_export.json saying
which run, edits and hparams produced it. evaluate.py --save_model does the same at the end of a run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from util.deltas import digest, restore, snapshot
from util.errors import RunError
from util.files import atomic_write_json
from util.models import LoadedModel, load_model

EXPORT_INFO = "kedit_export.json"
WEIGHTS = re.compile(r"weights_(\d+)_(\d+)\.safetensors$")


def checkpoint_weights(run: Path, at: int | None = None) -> tuple[Path, int]:
    """The checkpoint's weight file after `at` edits (default: the latest) and its edit count."""
    folder = run / "checkpoint"
    state = folder / "state.json"
    if not state.is_file():
        raise RunError(f"{run}: no checkpoint ({state} does not exist)")
    latest = json.loads(state.read_text())
    if at is None or at == latest["n_edits"]:
        return folder / latest["files"]["weights"], latest["n_edits"]
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := WEIGHTS.match(p.name))}
    if at not in found:
        raise RunError(f"{run}: no checkpoint after {at} edits (it keeps those after {sorted(found)}); "
                       f"pause a run there with --stop_after to export it")
    return found[at], at


def save_model_folder(lm: LoadedModel, out: Path, info: dict[str, Any]) -> Path:
    """model.save_pretrained + tokenizer + kedit_export.json (provenance) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(out, safe_serialization=True)
    lm.tok.save_pretrained(out)
    atomic_write_json(out / EXPORT_INFO, info)
    return out


def provenance(run: Path, config: dict[str, Any], n_edits: int) -> dict[str, Any]:
    keys = ("alg_name", "mode", "batch_size", "seed", "model", "hparams", "git_commit", "weights0_sha256")
    return {"run": str(run.resolve()), "n_edits": n_edits, **{k: config.get(k) for k in keys}}


def save_run_model(lm: LoadedModel, run: Path, n_edits: int, out: str | Path | None = None) -> Path:
    """`lm`, holding `run`'s edits after `n_edits`, into `out` (default <run>/model_<n_edits>);
    evaluate.py --save_model calls it with the model in memory at the end of a session."""
    config = json.loads((run / "config.json").read_text())
    return save_model_folder(lm, Path(out) if out else run / f"model_{n_edits:06d}", provenance(run, config, n_edits))


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
    config = json.loads((run / "config.json").read_text())
    if config["mode"] == "batched":
        raise RunError(f"{run}: a batched run undoes every batch; only sequential runs leave an edited model")
    weights_file, n_edits = checkpoint_weights(run, at)
    lm = lm or load_model(config["model"], config["options"]["dtype"], device, model_cache=model_cache)
    names = config["edited_params"]
    if digest(snapshot(lm.model, names)) != config["weights0_sha256"]:
        raise RunError(f"{run}: the loaded model's edited matrices differ from those the run started from ({config['model']})")
    weights = load_file(str(weights_file))
    restore(lm.model, {name: weights[name] for name in names})
    return save_run_model(lm, run, n_edits, out)
