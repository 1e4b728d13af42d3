"""Result files written so that a crash or a full disk never leaves a half file, and read back
tolerating the one line a crash can cut: atomic replace, JSON lines, and one-line write errors."""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from util.errors import RunError

log = logging.getLogger(__name__)


@contextmanager
def writing(path: Path, consequence: str) -> Iterator[None]:
    """An OSError (ENOSPC, EACCES, EROFS...) while writing `path` becomes one line naming the path
    and the errno, and what it means for the run."""
    try:
        yield
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err} (errno {err.errno}); {consequence}") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temporary name, fsync, rename, fsync of the folder: `path` is the old file or the new one,
    never a part; on failure the temporary file is removed and the OSError re-raised. The
    temporary name is the process's own: two processes writing the same file (two runs filling one
    value cache) each rename a whole file of their own."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut; it has happened either way, so only warn
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as err:
        log.warning("%s written, but its folder could not be synced: %s", path, err)


def atomic_write_text(path: Path, text: str) -> None:
    with writing(path, "the previous version of the file is unchanged"):
        atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


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
        with writing(path, "the run cannot write its results there"):
            self._handle = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(jsonable(record), allow_nan=False) + "\n"
        with writing(self.path, "lines after the last checkpoint are cut when the run is continued"):
            self._handle.write(line)
            self._handle.flush()

    def size(self) -> int:
        self._handle.flush()
        return self._handle.tell()

    def truncate(self, size: int) -> None:
        self._handle.flush()
        self._handle.truncate(size)
        self._handle.seek(size)

    def sync(self, consequence: str) -> None:
        with writing(self.path, consequence):
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        try:
            self._handle.close()
        except OSError as err:  # the buffer could not be flushed (full disk): already reported by write()
            log.warning("closing %s: %s", self.path, err)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines only (a line cut by a crash is ignored)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]  # lines[-1]: "" or a cut line
