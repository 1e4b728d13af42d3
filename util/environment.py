"""What a process finds around it: the environment variables the project reads, read once by
`Environment.read()` at a command line's edge (or the notebook API's) and passed down as explicit
values, and whether the network answers.

    KEDIT_CORPUS        statistics and TF-IDF corpus when --corpus is not given
    KEDIT_DATA_DIR      a reference data folder, searched after --data_dir
    KEDIT_DOWNLOAD_DIR  where fetched data files go (default: <project>/data/downloads)
    HF_HUB_OFFLINE, HF_DATASETS_OFFLINE   "1": do not reach the network, as for Hugging Face's libraries
    KEDIT_GIT_SHA       the commit recorded with a run where the code is not a git checkout
    KEDIT_CACHE         root of the caches (default: ~/.cache/kedit), as `Environment.caches`
    KEDIT_MODEL_CACHE   dequantised embedded models (default: <KEDIT_CACHE>/models)
    KEDIT_SYSTEM_MALLOC "1": leave glibc's malloc settings as they are (util/cli.py's run_cli)

No other module reads these variables (tests/test_module_state.py checks it): library functions
take the values, the cache folders as a util.paths.Caches, from their caller.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from util.paths import PROJECT_ROOT, Caches


@dataclass(frozen=True)
class Environment:
    """The variables' values; the defaults are those of an empty environment."""

    corpus: str | None = None
    data_dir: str | None = None
    download_dir: str | None = None  # None: <project>/data/downloads
    offline: bool = False
    git_sha: str | None = None
    cache_dir: str | None = None  # None: ~/.cache/kedit
    model_cache_dir: str | None = None  # None: <cache_dir>/models
    system_malloc: bool = False  # leave malloc as it is (util/cli.keep_freed_memory)

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> "Environment":
        env = os.environ if environ is None else environ
        return cls(
            corpus=env.get("KEDIT_CORPUS") or None,
            data_dir=env.get("KEDIT_DATA_DIR") or None,
            download_dir=env.get("KEDIT_DOWNLOAD_DIR") or None,
            offline=env.get("HF_HUB_OFFLINE") == "1" or env.get("HF_DATASETS_OFFLINE") == "1",
            git_sha=env.get("KEDIT_GIT_SHA") or None,
            cache_dir=env.get("KEDIT_CACHE") or None,
            model_cache_dir=env.get("KEDIT_MODEL_CACHE") or None,
            system_malloc=env.get("KEDIT_SYSTEM_MALLOC") == "1",
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "Environment":
        return cls(**dict(values or {}))

    @property
    def downloads(self) -> Path:
        """The folder fetched data files go to (gitignored inside the project by default)."""
        return Path(self.download_dir).expanduser() if self.download_dir else PROJECT_ROOT / "data" / "downloads"

    @property
    def caches(self) -> Caches:
        """The cache folders these variables name, or the defaults."""
        root = Path(self.cache_dir).expanduser() if self.cache_dir else Path.home() / ".cache" / "kedit"
        return Caches(root, Path(self.model_cache_dir).expanduser() if self.model_cache_dir else root / "models")


def online(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0, offline: bool = False) -> bool:
    """Whether `host` answers on `port` within `timeout` seconds; never tried when `offline`."""
    if offline:
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False
