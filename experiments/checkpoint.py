"""The run folder on disk: numbered folders, JSONL streams, atomic files and checkpoints.

    results/<ALG>/run_NNN/
        config.json                    what was run (written once)
        edits.jsonl probes.jsonl cases.jsonl   streams, one flushed line per record
        checkpoint/state.json          the commit point: position, stream sizes, run state
        checkpoint/weights_<n>.safetensors   the edited matrices after n edits (only those)
        checkpoint/context_<n>.safetensors   tensors of EditContext.state, if any

A checkpoint is committed by atomically replacing state.json, which names its weight file; files
of older checkpoints are removed afterwards. A crash at any moment leaves either the old or the
new checkpoint whole. On resume every stream is cut back to its size at the checkpoint, so lines
written after it (and a half-written last line) disappear and are produced again.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from experiments.run_config import RunError

STREAMS = ("edits", "probes", "cases")
RUN_NAME = re.compile(r"run_(\d{3,})$")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def jsonable(value: Any) -> Any:
    """Plain JSON: NaN and infinities become null, tuples lists, numpy/torch scalars numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlStream:
    """Append-only JSON lines; every line is flushed as it is written."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
        self._handle.flush()

    def size(self) -> int:
        self._handle.flush()
        return self._handle.tell()

    def truncate(self, size: int) -> None:
        self._handle.flush()
        self._handle.truncate(size)
        self._handle.seek(size)

    def sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines only (a line cut by a crash is ignored)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]  # lines[-1]: "" or a cut line


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
        self.checkpoints = path / "checkpoint"
        self.streams: dict[str, JsonlStream] = {}

    @classmethod
    def create(cls, results_dir: str | Path, alg_name: str) -> "RunFolder":
        """The next free results/<ALG>/run_NNN (created exclusively, so parallel runs never share one)."""
        root = Path(results_dir) / alg_name
        root.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in root.iterdir() if (m := RUN_NAME.match(p.name))]
        number = max(taken, default=0) + 1
        while True:
            path = root / f"run_{number:03d}"
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                number += 1

    @classmethod
    def existing(cls, results_dir: str | Path, alg_name: str, name: str) -> "RunFolder":
        path = Path(name) if Path(name).is_dir() and Path(name).name.startswith("run_") else Path(results_dir) / alg_name / name
        if not (path / "config.json").is_file():
            raise RunError(f"--continue_from_run {name}: {path / 'config.json'} does not exist")
        return cls(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def read_config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

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

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        self.checkpoints.mkdir(exist_ok=True)
        for stream in self.streams.values():
            stream.sync()
        tag = f"{ckpt.n_edits:06d}_{ckpt.position:06d}"
        atomic_save_tensors(self.checkpoints / f"weights_{tag}.safetensors", ckpt.weights)
        files = {"weights": f"weights_{tag}.safetensors"}
        if ckpt.context:
            atomic_save_tensors(self.checkpoints / f"context_{tag}.safetensors", ckpt.context)
            files["context"] = f"context_{tag}.safetensors"
        state = {"position": ckpt.position, "n_edits": ckpt.n_edits, "sizes": ckpt.sizes, "files": files, "state": ckpt.state}
        atomic_write_json(self.checkpoints / "state.json", state)
        for old in self.checkpoints.glob("*.safetensors"):
            if old.name not in files.values():
                old.unlink()

    def load_checkpoint(self) -> Checkpoint | None:
        path = self.checkpoints / "state.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        files = data["files"]
        weights = load_file(str(self.checkpoints / files["weights"]))
        context = load_file(str(self.checkpoints / files["context"])) if "context" in files else {}
        return Checkpoint(data["position"], data["n_edits"], data["sizes"], weights, context, data["state"])
