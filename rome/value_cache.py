"""Target values kept on disk and reused: a request's optimised delta depends only on the model's
weights, the request, the context templates, the edited layer and the value hparams, so an edit
that meets the same ones again (the batch sizes of a batched study, a lambda sweep, a repeated
run) reads it instead of optimising it. The original MEMIT code keeps such a cache per case id;
this one keys an entry by everything the value depends on (`ValueCache.key`), the weights by their
SHA-256, so that it is never read for another model or another state of it.

An entry holds the request's delta and reference vector and its optimisation record (steps, final
loss, target probability), written by the run that first computed it: a value computed in a batch
of other requests equals the one computed alone up to float rounding (tests/test_compute_v.py), so
a run reading the cache gets the same numbers as one computing everything up to that rounding.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from rome.compute_v import ValueResult, ValueSettings
from rome.hparams import EditHyperParams
from util.files import atomic_write_bytes
from util.models import LoadedModel
from util.requests import EditRequest

log = logging.getLogger(__name__)

# Bumped when what an entry holds, or the optimisation it records, changes meaning.
FORMAT = 1
# Hparams the values do not read: key statistics (C0) and how keys are averaged; the edited layers
# enter as the one whose output is optimised. Each solver's own constants (EMMET's lambda, a null
# space's threshold) are named by the caller.
NOT_READ_BY_VALUES = ("layers", "mom2_adjustment", "mom2_n_samples", "mom2_sample_tokens", "mom2_dtype",
                      "mom2_update_weight", "mom2_dataset", "key_average")


class ValueCache:
    """Values in `root` (one safetensors file per entry, in a folder per model state). The digest
    of the weights is kept per parameter and recomputed only for a parameter changed since (torch
    counts in-place writes per tensor): between the batches of a batched run only the edited
    matrices are hashed again."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._digests: dict[str, tuple[tuple, str]] = {}
        self.hits = self.misses = 0

    @torch.no_grad()
    def weights_digest(self, model: torch.nn.Module) -> str:
        """SHA-256 over the model's configuration and every parameter's name, dtype, shape and bytes."""
        config = model.config.to_dict() if hasattr(model, "config") else {}
        for volatile in ("transformers_version", "_name_or_path"):
            config.pop(volatile, None)
        total = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        for name, param in model.named_parameters():
            stamp = (param.data_ptr(), param._version, tuple(param.shape), param.dtype, param.device)
            known = self._digests.get(name)
            if known is None or known[0] != stamp:
                digest = hashlib.sha256(f"{param.dtype}{tuple(param.shape)}".encode())
                digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                known = self._digests[name] = (stamp, digest.hexdigest())
            total.update(f"{name}\0{known[1]}\0".encode())
        return total.hexdigest()

    def key(self, weights: str, request: EditRequest, layer: int, site: str, templates: list[str], hparams: EditHyperParams,
            settings: ValueSettings, solver_only: tuple[str, ...] = ()) -> str:
        """The entry of `request`'s value at `layer` (`site` output) on the weights `weights`."""
        read = {k: v for k, v in dataclasses.asdict(hparams).items() if k not in NOT_READ_BY_VALUES + solver_only}
        what = {"format": FORMAT, "weights": weights, "layer": layer, "site": site, "templates": templates,
                "hparams": {"class": type(hparams).__name__, **read},
                "request": [request.prompt, request.subject, request.target_new, request.target_true],
                "settings": [settings.fast, str(settings.autocast), settings.compiled, settings.true_penalty, list(settings.kinds)]}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, weights: str, key: str) -> Path:
        return self.root / weights[:16] / f"{key}.safetensors"

    def read(self, weights: str, key: str) -> ValueResult | None:
        path = self._path(weights, key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                delta, reference = f.get_tensor("delta"), f.get_tensor("reference")
                record = json.loads(f.metadata()["record"])
        except (OSError, ValueError, KeyError, SafetensorError):  # a torn or foreign file: recomputed and rewritten
            return None
        return ValueResult(delta[None], reference[None], [record["steps"]], [record["final_loss"]],
                           [record["target_prob"]], [record["delta_ratio"]])

    def write(self, weights: str, key: str, value: ValueResult) -> None:
        """`value`: one request's (n = 1)."""
        record = {"steps": value.steps[0], "final_loss": value.final_loss[0], "target_prob": value.target_prob[0],
                  "delta_ratio": value.delta_ratio[0]}
        tensors = {"delta": value.delta[0].contiguous(), "reference": value.reference[0].contiguous()}
        path = self._path(weights, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(tensors, metadata={"record": json.dumps(record)}))


def values_through_cache(cache: ValueCache | None, lm: LoadedModel, requests: list[EditRequest], layer: int, site: str,
                         templates: list[str], hparams: EditHyperParams, settings: ValueSettings,
                         optimise: Callable[[list[int]], ValueResult], solver_only: tuple[str, ...] = ()) -> tuple[ValueResult, list[bool]]:
    """The values of `requests`: those `cache` (if any) holds read from it, the others from
    `optimise(indices)` (the values of requests[i] for i in indices, in that order), a chunk of
    settings.chunk_size at a time (the chunks optimise_values takes), each written to the cache as
    soon as it is done: a large batch interrupted (a SIGTERM rolls the edit back) and run again
    optimises only the chunks it had not finished. A batch of several chunks logs each one's end
    (a batch of 4,096 takes hours on a CPU). Returns the values in request order and, per
    request, whether it came from the cache."""
    n = len(requests)
    weights, keys, found = None, [], [None] * n
    if cache is not None:
        weights = cache.weights_digest(lm.model)
        keys = [cache.key(weights, r, layer, site, templates, hparams, settings, solver_only) for r in requests]
        found = [cache.read(weights, key) for key in keys]
    missing = [i for i, value in enumerate(found) if value is None]
    if cache is not None:
        cache.hits, cache.misses = cache.hits + n - len(missing), cache.misses + len(missing)
    chunks = [missing[start:start + settings.chunk_size] for start in range(0, len(missing), settings.chunk_size)]
    began = time.perf_counter()
    for number, part in enumerate(chunks, 1):
        computed = optimise(part)
        for j, i in enumerate(part):
            found[i] = computed.row(j)
            if cache is not None:
                cache.write(weights, keys[i], found[i])
        if len(chunks) > 1:
            done = sum(map(len, chunks[:number]))
            log.info("values: %d of %d requests optimised (chunk %d of %d, %.1f s per request)%s", done, len(missing), number,
                     len(chunks), (time.perf_counter() - began) / done, f"; {n - len(missing)} read from the cache" if n > len(missing) else "")
    return ValueResult.joined(found), [i not in missing for i in range(n)]
