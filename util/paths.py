"""Where caches live. KEDIT_CACHE and KEDIT_MODEL_CACHE redirect them; they are the environment
variables still read where they are used (the caches of templates and statistics are opened inside
rome/), every other one is read once at the command line's edge (util/environment.py)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root of all caches (dequantised models, statistics, context templates, sampled corpora)."""
    root = os.environ.get("KEDIT_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "kedit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def slug(text: str) -> str:
    """A file-name-safe form of a model id or path."""
    keep = [c if c.isalnum() or c in "-_." else "_" for c in text.strip("/")]
    return "".join(keep)[-120:] or "unnamed"


def model_cache_dir() -> Path:
    """Dequantised copies of embedded models (large, reused across runs and test sessions)."""
    root = os.environ.get("KEDIT_MODEL_CACHE")
    path = Path(root) if root else cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (data files, corpora, checkpoint weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
