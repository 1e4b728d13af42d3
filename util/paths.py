"""Where things live: the project folder, and the cache folders (`Caches`). The caches' root comes
from the environment (KEDIT_CACHE, KEDIT_MODEL_CACHE), read once at a command line's edge or the
notebook API's (util/environment.py, `Environment.caches`) and passed down; nothing here reads
environment variables."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A run folder's checkpoint (experiments/pipeline/checkpoint.py writes it; the reports read the
# run state, e.g. its sessions, from the committed state file).
CHECKPOINT_FOLDER, CHECKPOINT_STATE = "checkpoint", "state.json"


@dataclass(frozen=True)
class Caches:
    """The cache folders, each created by whoever first writes into it. `root` holds what is
    derived per model or corpus; `models` the dequantised copies of embedded models (large and
    shared across runs and test sessions, so they may live apart: KEDIT_MODEL_CACHE)."""

    root: Path
    models: Path

    @property
    def stats(self) -> Path:
        """Key second moments and null-space bases (util/stats.py)."""
        return self.root / "stats"

    @property
    def templates(self) -> Path:
        """Context templates sampled from each model (rome/templates.py)."""
        return self.root / "templates"

    @property
    def values(self) -> Path:
        """Optimised target values by model weights, request and hparams (rome/value_cache.py)."""
        return self.root / "values"

    @property
    def corpora(self) -> Path:
        """Texts sampled from a model when no corpus is given offline (util/corpus.py)."""
        return self.root / "corpora"

    @property
    def file_hashes(self) -> Path:
        """SHA-256 of corpus files by (path, size, mtime) (util/corpus.py)."""
        return self.root / "file_hashes"

    @property
    def known(self) -> Path:
        """Which known facts each model completes before editing (experiments/pipeline/evals.py)."""
        return self.root / "known"

    @property
    def tfidf(self) -> Path:
        """TF-IDF tables fitted on a corpus (experiments/pipeline/evals.py)."""
        return self.root / "tfidf"


def slug(text: str) -> str:
    """A file-name-safe form of a model id or path."""
    keep = [c if c.isalnum() or c in "-_." else "_" for c in text.strip("/")]
    return "".join(keep)[-120:] or "unnamed"


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (data files, corpora, checkpoint weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
