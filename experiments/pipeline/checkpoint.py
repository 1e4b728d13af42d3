"""The run folder on disk: numbered folders, JSONL streams, atomic files and checkpoints.

    results/<ALG>/run_NNN/
        config.json                    what was run (written once)
        edits.jsonl probes.jsonl cases.jsonl   streams, one flushed line per record
        checkpoint/state.json          the commit point: position, stream sizes, run state, manifest
        checkpoint/weights_<n>_<sha>.safetensors   the edited matrices after n edits (only those)
        checkpoint/context_<n>_<sha>.safetensors   tensors of EditContext.state, if any
    results/<ALG>/.run_NNN.lock        who holds the run folder's lock (experiments/pipeline/runlock.py)

A checkpoint is committed by atomically replacing state.json (temporary name, fsync, rename),
which names its weight files and records their sizes and SHA-256 (the manifest); files of older
checkpoints are removed afterwards. A crash at any moment leaves either the old or the new
checkpoint whole, and a failed write (full disk, no permission) leaves the old one in place.

Continuing checks the checkpoint before trusting it (`RunFolder.verify`): a missing or damaged
state.json or weight file, or a stream shorter than recorded, ends in one line and changes
nothing. Lines written after the checkpoint by a session that crashed (its state says "running")
are cut on resume and produced again; after a session that ended cleanly there can be none.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from experiments.pipeline.runlock import RunLock
from util.checks import read_tensors
from util.errors import RunError
from util.files import JsonlStream, atomic_write_bytes, jsonable, writing
from util.paths import CHECKPOINT_FOLDER, CHECKPOINT_STATE, sha256_file

log = logging.getLogger(__name__)

STREAMS = ("edits", "probes", "cases")
RUN_NAME = re.compile(r"run_(\d{3,})$")
CHECKPOINT_KEYS = ("position", "n_edits", "sizes", "files", "state")


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Checkpoint:
    position: int  # batches done
    n_edits: int
    sizes: dict[str, int]  # stream name -> bytes at the checkpoint
    weights: dict[str, torch.Tensor]
    context: dict[str, torch.Tensor]
    state: dict[str, Any]  # JSON run state (health history, status, sessions)


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / CHECKPOINT_FOLDER
        self.streams: dict[str, JsonlStream] = {}
        self._lock: RunLock | None = None

    @classmethod
    def create(cls, results_dir: str | Path, alg_name: str) -> "RunFolder":
        """The next free results/<ALG>/run_NNN (created exclusively, so parallel runs never share
        one), locked for this process."""
        root = Path(results_dir) / alg_name
        with writing(root, "no run folder could be created"):
            root.mkdir(parents=True, exist_ok=True)
            taken = [int(m.group(1)) for p in root.iterdir() if (m := RUN_NAME.match(p.name))]
            number = max(taken, default=0) + 1
            while True:
                path = root / f"run_{number:03d}"
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    number += 1
        folder = cls(path)
        folder.lock()
        return folder

    @classmethod
    def existing(cls, results_dir: str | Path, alg_name: str, name: str) -> "RunFolder":
        path = Path(name) if Path(name).is_dir() and Path(name).name.startswith("run_") else Path(results_dir) / alg_name / name
        if not (path / "config.json").is_file():
            raise RunError(f"--continue_from_run {name}: {path / 'config.json'} does not exist")
        return cls(path)

    def lock(self) -> None:
        """Become the run's one writer (or fail in one line naming the holder)."""
        if self._lock is None:
            self._lock = RunLock.acquire(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    def read_config(self) -> dict[str, Any]:
        path = self.path / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"{path}: cannot be read ({err}); this run cannot be continued: restore the file or start a new run") from None
        if not isinstance(config, dict) or not isinstance(config.get("options"), dict):
            raise RunError(f"{path}: not a run configuration (no 'options'); restore the file or start a new run")
        return config

    def open_streams(self) -> None:
        for name in STREAMS:
            self.streams[name] = JsonlStream(self.path / f"{name}.jsonl")

    def sizes(self) -> dict[str, int]:
        return {name: stream.size() for name, stream in self.streams.items()}

    def cut_streams(self, sizes: dict[str, int]) -> None:
        for name, stream in self.streams.items():
            stream.truncate(sizes.get(name, 0))

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()
        self.streams.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        """Write the checkpoint's files, then commit it by replacing state.json. An I/O error ends
        in one line; the previous checkpoint (state.json and the files it names) stays valid."""
        if (self.checkpoints / CHECKPOINT_STATE).is_file():
            consequence = f"the previous checkpoint is intact: fix the cause and continue with --continue_from_run {self.path}"
        else:  # the run's first checkpoint: there is nothing to continue from
            consequence = "no checkpoint of this run was written yet, so it cannot be continued: fix the cause and start it again"
        with writing(self.checkpoints, consequence):
            self.checkpoints.mkdir(exist_ok=True)
        for stream in self.streams.values():
            stream.sync(consequence)
        tag = f"{ckpt.n_edits:06d}_{ckpt.position:06d}"
        files, blobs, manifest = {}, {}, {}
        for kind, tensors in (("weights", ckpt.weights), ("context", ckpt.context)):
            if kind == "weights" or tensors:
                data = tensor_bytes(tensors)
                digest = sha256_bytes(data)
                # the digest in the name: a committed file is never overwritten with other bytes
                files[kind] = name = f"{kind}_{tag}_{digest[:12]}.safetensors"
                blobs[name], manifest[name] = data, {"bytes": len(data), "sha256": digest}
        state = {"position": ckpt.position, "n_edits": ckpt.n_edits, "sizes": ckpt.sizes, "files": files,
                 "manifest": manifest, "state": ckpt.state}
        committed = self._committed_files()
        written = []
        try:
            for name, data in blobs.items():
                path = self.checkpoints / name
                if name not in committed:
                    with writing(path, consequence):
                        atomic_write_bytes(path, data)
                    written.append(path)
            text = json.dumps(jsonable(state), indent=2, allow_nan=False) + "\n"
            with writing(self.checkpoints / CHECKPOINT_STATE, consequence):
                atomic_write_bytes(self.checkpoints / CHECKPOINT_STATE, text.encode("utf-8"))
        except RunError:
            for path in written:  # never named by a committed state.json
                path.unlink(missing_ok=True)
            raise
        for old in self.checkpoints.glob("*.safetensors"):
            if old.name not in files.values():
                old.unlink()

    def _committed_files(self) -> set[str]:
        """The files the current state.json names."""
        try:
            return set(json.loads((self.checkpoints / CHECKPOINT_STATE).read_text(encoding="utf-8"))["files"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return set()

    def verify(self) -> dict[str, Any]:
        """The checkpoint's state.json, after checking that it and every file it describes are whole;
        one line naming the file otherwise. Reads only."""
        cannot = "this run cannot be continued; start a new run or restore the file"
        data = self.committed(cannot)
        for name in data["files"].values():
            self.verify_file(data, name, cannot)
        clean_end = data["state"].get("status") != "running"
        for name in STREAMS:
            self._verify_stream(self.path / f"{name}.jsonl", data["sizes"].get(name, 0), clean_end)
        return data

    def committed(self, cannot: str) -> dict[str, Any]:
        """The committed checkpoint's state.json, whole (its files are not checked); one line
        naming it, followed by `cannot`, where it is missing or damaged."""
        path = self.checkpoints / CHECKPOINT_STATE
        if not path.is_file():
            raise RunError(f"{path} missing: {cannot}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"{path} is damaged ({err}): {cannot}") from None
        if not isinstance(data, dict) or any(key not in data for key in CHECKPOINT_KEYS):
            raise RunError(f"{path} is damaged (it lacks one of {', '.join(CHECKPOINT_KEYS)}): {cannot}")
        if data.get("manifest") is None:
            log.warning("%s predates checkpoint manifests: its files are checked for presence only", path)
        return data

    def verify_file(self, committed: dict[str, Any], name: str, cannot: str) -> Path:
        """checkpoint/<name>, checked against the size and SHA-256 the committed state.json records."""
        path = self.checkpoints / name
        if not path.is_file():
            raise RunError(f"{path} missing: {cannot}")
        entry = (committed.get("manifest") or {}).get(name)
        if entry is None:
            return path
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise RunError(f"{path} holds {size} bytes, the checkpoint recorded {entry['bytes']}: {cannot}")
        if sha256_file(path) != entry["sha256"]:
            raise RunError(f"{path} differs from the checkpoint's SHA-256: {cannot}")
        return path

    @staticmethod
    def _verify_stream(path: Path, recorded: int, clean_end: bool) -> None:
        size = path.stat().st_size if path.is_file() else None
        restore = "this run cannot be continued; restore the file or start a new run"
        if size is None:
            if recorded:
                raise RunError(f"{path} missing (the checkpoint recorded {recorded} bytes): {restore}")
            return
        if size < recorded:
            raise RunError(f"{path} holds {size} bytes, fewer than the {recorded} the checkpoint recorded: {restore}")
        if size > recorded and clean_end:
            raise RunError(f"{path} holds {size} bytes, more than the {recorded} recorded by a checkpoint that ended "
                           f"its session cleanly (written by another process?): {restore}")
        if recorded:
            with path.open("rb") as handle:
                handle.seek(recorded - 1)
                if handle.read(1) != b"\n":
                    raise RunError(f"{path} does not end a line at the {recorded} bytes the checkpoint recorded: {restore}")

    def load_checkpoint(self, data: dict[str, Any]) -> Checkpoint:
        """The checkpoint `verify` returned, with its tensors."""
        files = data["files"]
        weights = self._tensors(files["weights"])
        context = self._tensors(files["context"]) if "context" in files else {}
        return Checkpoint(data["position"], data["n_edits"], data["sizes"], weights, context, data["state"])

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        return read_tensors(self.checkpoints / name, RunError, "this run cannot be continued; start a new run or restore the file")
