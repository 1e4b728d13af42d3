"""Key statistics shared as files: computed once, exported, imported where they are used.

    DIR/key_stats.safetensors   layer.<L>.mom2 (C0 = E[k k^T], float64, m x m) per layer, and
                                layer.<L>.nullspace (AlphaEdit's U, P = U U^T) where computed
    DIR/manifest.json           model, revision, fingerprint of its weights, per layer the module,
                                shape and key count, corpus ident, token count, forward dtype,
                                and the tensor file's sha256

Importing checks the manifest against the model it is used with (architecture, module names,
shapes, revision where both know one, and a fingerprint of the weights the statistics depend on)
and stores the matrices (C0 and, where exported, the null-space basis) in the statistics cache
under the importing model's name, where a run with the same corpus, token count and dtype (and,
for AlphaEdit, nullspace_threshold) finds them instead of computing them.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from util.arch import edited_weight
from util.corpus import Corpus
from util.errors import KeditError
from util.models import LoadedModel
from util.stats import NullspaceKey, SecondMoment, StatsCache, StatsKey

FORMAT = "kedit-key-stats/1"
MANIFEST, TENSORS = "manifest.json", "key_stats.safetensors"


class StatsShareError(KeditError):
    """A statistics folder that is missing, corrupted, or made for another model."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def fingerprint(lm: LoadedModel, deepest: int) -> str:
    """sha256 of the weights, as float32 (the same checkpoint loaded in another dtype matches),
    except those of layers after `deepest`, on which keys up to that layer do not depend."""
    prefix = lm.arch.layer(0).rsplit(".", 1)[0] + "."  # e.g. "model.layers."
    digest = hashlib.sha256()
    for name, param in lm.model.named_parameters():
        if name.startswith(prefix) and int(name[len(prefix):].split(".", 1)[0]) > deepest:
            continue
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def revision(lm: LoadedModel) -> str | None:
    """The Hugging Face commit the model was loaded from, when known."""
    return getattr(lm.model.config, "_commit_hash", None)


def export_stats(lm: LoadedModel, layers: list[int], corpus: Corpus, n_samples: int, sample_tokens: int,
                 dtype: str, out: str | Path, cache: StatsCache, nullspace_threshold: float | None = None) -> Path:
    """Compute (or take from `cache`) C0 at `layers` and write DIR/key_stats.safetensors + manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    moments = cache.second_moments(lm, layers, corpus, n_samples, sample_tokens, dtype)
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for layer, moment in moments.items():
        entry = {"layer": layer, "module": lm.arch.down_proj(layer), "shape": list(moment.mom2.shape),
                 "count": moment.count, "mom2": f"layer.{layer}.mom2", "nullspace": None}
        tensors[entry["mom2"]] = moment.mom2.contiguous()
        if nullspace_threshold is not None:  # from the cache where a run or an import put it
            basis = cache.nullspace(moment, nullspace_threshold, edited_weight(lm.model, lm.arch, layer).device).cpu()
            entry["nullspace"] = {"tensor": f"layer.{layer}.nullspace", "threshold": nullspace_threshold, "rank": basis.shape[1]}
            tensors[entry["nullspace"]["tensor"]] = basis.contiguous()
        entries.append(entry)
    save_file(tensors, str(out / TENSORS))
    manifest = {
        "format": FORMAT, "model": lm.name, "model_type": lm.model.config.model_type, "revision": revision(lm),
        "fingerprint": fingerprint(lm, max(layers)), "fingerprint_layers": max(layers),
        "corpus": corpus.ident, "corpus_kind": corpus.kind, "n_samples": n_samples, "sample_tokens": sample_tokens,
        "n_tokens": n_samples * sample_tokens, "dtype": dtype, "layers": entries,
        "tensors_sha256": file_sha256(out / TENSORS), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise StatsShareError(f"{path} does not exist: not an exported statistics folder (key_stats.py --export)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StatsShareError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StatsShareError(f"{path}: key 'format' must be {FORMAT!r}")
    return manifest


def check_manifest(manifest: dict[str, Any], lm: LoadedModel, where: Path) -> None:
    """Raise StatsShareError (one line) unless the statistics were computed on this model."""
    if manifest["model_type"] != lm.model.config.model_type:
        raise StatsShareError(f"{where}: statistics of a {manifest['model_type']} model ({manifest['model']}), "
                              f"not of {lm.name} ({lm.model.config.model_type})")
    if manifest["revision"] and revision(lm) and manifest["revision"] != revision(lm):
        raise StatsShareError(f"{where}: revision {manifest['revision']} of {manifest['model']}, but {lm.name} is at {revision(lm)}")
    for entry in manifest["layers"]:
        layer = entry["layer"]
        if layer >= lm.model.config.num_hidden_layers or entry["module"] != lm.arch.down_proj(layer):
            raise StatsShareError(f"{where}: layer {layer} ({entry['module']}) does not exist in {lm.name}")
        width = edited_weight(lm.model, lm.arch, layer).shape[1]
        if entry["shape"] != [width, width]:
            raise StatsShareError(f"{where}: layer {layer}: C0 is {entry['shape']}, {lm.name}'s keys have {width} dimensions")
    if manifest["fingerprint"] != fingerprint(lm, manifest["fingerprint_layers"]):
        raise StatsShareError(f"{where}: computed on {manifest['model']} with other weights than {lm.name}'s "
                              f"(fingerprint of layers 0-{manifest['fingerprint_layers']} differs)")


def import_stats(lm: LoadedModel, folder: str | Path, cache: StatsCache) -> list[StatsKey]:
    """Check `folder` against `lm` and store its C0 matrices in `cache`; returns their keys."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    where = folder / MANIFEST
    check_manifest(manifest, lm, where)
    tensor_file = folder / TENSORS
    if not tensor_file.is_file() or file_sha256(tensor_file) != manifest["tensors_sha256"]:
        raise StatsShareError(f"{tensor_file}: missing or corrupted (sha256 differs from {where})")
    tensors = load_file(str(tensor_file))
    keys = []
    for entry in manifest["layers"]:
        key = StatsKey(lm.name, entry["module"], manifest["corpus"], manifest["n_tokens"], manifest["dtype"])
        cache.store(SecondMoment(tensors[entry["mom2"]], entry["count"], key))
        if entry["nullspace"]:  # AlphaEdit runs with this threshold load it instead of an eigh
            cache.store_nullspace(NullspaceKey(key, entry["nullspace"]["threshold"]), tensors[entry["nullspace"]["tensor"]])
        keys.append(key)
    return keys
