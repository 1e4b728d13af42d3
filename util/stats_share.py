"""Key statistics shared as files: computed once, exported, imported where they are used.

    DIR/key_stats.safetensors   layer.<L>.mom2 (C0 = E[k k^T], float64, m x m) per layer, and
                                layer.<L>.nullspace (AlphaEdit's U, P = U U^T) where computed
    DIR/manifest.json           model, revision, fingerprint of its weights, per layer the module,
                                shape and key count, corpus ident, token count, forward dtype,
                                and the tensor file's sha256

Importing checks the manifest (every key present and of its type) against the model it is used
with (architecture, module names, shapes, revision where both know one, and a fingerprint of the
weights the statistics depend on), the tensor file against the manifest's SHA-256, and every
tensor (present, of the model's shape, finite) before it stores anything; then it stores the matrices (C0 and, where exported, the null-space basis) in the statistics cache
under the importing model's name, where a run with the same corpus, token count and dtype (and,
for AlphaEdit, nullspace_threshold) finds them instead of computing them.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from util.arch import edited_weight
from util.checks import checked_tensor, read_tensors
from util.corpus import Corpus
from util.errors import KeditError
from util.files import atomic_write_text
from util.models import LoadedModel
from util.paths import sha256_file
from util.stats import NullspaceKey, SecondMoment, StatsCache, StatsKey

FORMAT = "kedit-key-stats/1"
MANIFEST, TENSORS = "manifest.json", "key_stats.safetensors"


class StatsShareError(KeditError):
    """A statistics folder that is missing, corrupted, or made for another model."""


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
    tmp = out / (TENSORS + ".partial")  # whole files only: the tensors, then the manifest naming their SHA-256
    save_file(tensors, str(tmp))
    os.replace(tmp, out / TENSORS)
    manifest = {
        "format": FORMAT, "model": lm.name, "model_type": lm.model.config.model_type, "revision": revision(lm),
        "fingerprint": fingerprint(lm, max(layers)), "fingerprint_layers": max(layers),
        "corpus": corpus.ident, "corpus_kind": corpus.kind, "n_samples": n_samples, "sample_tokens": sample_tokens,
        "n_tokens": n_samples * sample_tokens, "dtype": dtype, "layers": entries,
        "tensors_sha256": sha256_file(out / TENSORS), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out


# The manifest's keys and their types (util/stats_share.py writes them); a layer entry's too.
MANIFEST_KEYS: dict[str, tuple[type, ...]] = {
    "model": (str,), "model_type": (str,), "revision": (str, type(None)), "fingerprint": (str,), "fingerprint_layers": (int,),
    "corpus": (str,), "corpus_kind": (str,), "n_samples": (int,), "sample_tokens": (int,), "n_tokens": (int,),
    "dtype": (str,), "layers": (list,), "tensors_sha256": (str,),
}
LAYER_KEYS: dict[str, tuple[type, ...]] = {"layer": (int,), "module": (str,), "shape": (list,), "count": (int,),
                                           "mom2": (str,), "nullspace": (dict, type(None))}
NULLSPACE_KEYS: dict[str, tuple[type, ...]] = {"tensor": (str,), "threshold": (int, float), "rank": (int,)}


def _check_keys(values: Any, keys: dict[str, tuple[type, ...]], where: Path, prefix: str) -> None:
    """Every key of `keys` present with a value of its types (a bool is no number)."""
    if not isinstance(values, dict):
        raise StatsShareError(f"{where}: {prefix.rstrip('.') or 'the manifest'} must be a mapping, got {values!r}")
    for key, types in keys.items():
        if key not in values:
            raise StatsShareError(f"{where}: key '{prefix}{key}' is missing")
        value = values[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise StatsShareError(f"{where}: key '{prefix}{key}' must be {names}, got {value!r}")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an exported statistics folder, with every key present and of its type."""
    path = folder / MANIFEST
    if not path.is_file():
        raise StatsShareError(f"{path} does not exist: not an exported statistics folder (key_stats.py --export)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StatsShareError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StatsShareError(f"{path}: key 'format' must be {FORMAT!r}")
    _check_keys(manifest, MANIFEST_KEYS, path, "")
    for i, entry in enumerate(manifest["layers"]):
        _check_keys(entry, LAYER_KEYS, path, f"layers[{i}].")
        if len(entry["shape"]) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in entry["shape"]):
            raise StatsShareError(f"{path}: key 'layers[{i}].shape' must be two whole numbers, got {entry['shape']!r}")
        if entry["nullspace"] is not None:
            _check_keys(entry["nullspace"], NULLSPACE_KEYS, path, f"layers[{i}].nullspace.")
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
        if not 0 <= layer < lm.model.config.num_hidden_layers or entry["module"] != lm.arch.down_proj(layer):
            raise StatsShareError(f"{where}: layer {layer} ({entry['module']}) does not exist in {lm.name}")
        width = edited_weight(lm.model, lm.arch, layer).shape[1]
        if entry["shape"] != [width, width]:
            raise StatsShareError(f"{where}: layer {layer}: C0 is {entry['shape']}, {lm.name}'s keys have {width} dimensions")
    if manifest["fingerprint"] != fingerprint(lm, manifest["fingerprint_layers"]):
        raise StatsShareError(f"{where}: computed on {manifest['model']} with other weights than {lm.name}'s "
                              f"(fingerprint of layers 0-{manifest['fingerprint_layers']} differs)")


def import_stats(lm: LoadedModel, folder: str | Path, cache: StatsCache) -> list[StatsKey]:
    """Check `folder` against `lm` and store its C0 matrices in `cache`; returns their keys. Every
    tensor is checked (present, of the model's shape, finite, a count of keys above 0) before
    anything is stored, so a refused folder leaves the cache as it was."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    where = folder / MANIFEST
    check_manifest(manifest, lm, where)
    tensor_file = folder / TENSORS
    if not tensor_file.is_file() or sha256_file(tensor_file) != manifest["tensors_sha256"]:
        raise StatsShareError(f"{tensor_file}: missing or corrupted (sha256 differs from {where})")
    tensors = read_tensors(tensor_file, StatsShareError, "export the statistics again")
    moments, bases = [], []
    for entry in manifest["layers"]:
        width = edited_weight(lm.model, lm.arch, entry["layer"]).shape[1]
        mom2 = checked_tensor(tensors, entry["mom2"], (width, width), tensor_file, StatsShareError)
        if entry["count"] < 1:
            raise StatsShareError(f"{where}: key 'count' of layer {entry['layer']} must be at least 1, got {entry['count']}")
        key = StatsKey(lm.name, entry["module"], manifest["corpus"], manifest["n_tokens"], manifest["dtype"])
        moments.append(SecondMoment(mom2, entry["count"], key))
        if entry["nullspace"]:  # AlphaEdit runs with this threshold load it instead of an eigh
            basis = checked_tensor(tensors, entry["nullspace"]["tensor"], (width, None), tensor_file, StatsShareError)
            bases.append((NullspaceKey(key, entry["nullspace"]["threshold"]), basis))
    for moment in moments:
        cache.store(moment)
    for key, basis in bases:
        cache.store_nullspace(key, basis)
    return [moment.key for moment in moments]
