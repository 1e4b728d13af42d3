"""Where data files come from, in this order:

1. `--data_dir` (the flag), 2. the KEDIT_DATA_DIR environment variable, 3. the project folder
data/downloads/ (gitignored; KEDIT_DOWNLOAD_DIR redirects it), 4. a download from the file's
canonical URL when online (written atomically into data/downloads/). The variables arrive as an
`Environment` (util/environment.py) read at the command line's edge; without one, only the flag's
folder and data/downloads are searched.

Each folder may hold a file flat (data_dir/counterfact.json) or in the layout of the shared
reference data (data_dir/counterfact/counterfact.json, data_dir/glue/sst2.jsonl, ...).
Offline with no local copy, the error says which file to place where.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from util.environment import Environment, online
from util.errors import DataError

log = logging.getLogger(__name__)

ROME_DATA = "https://rome.baulab.info/data/dsets"
DOWNLOAD_TIMEOUT = 30.0  # seconds per socket operation, not for the whole transfer


@dataclass(frozen=True)
class DataFile:
    what: str  # human name for messages, e.g. "CounterFact"
    names: tuple[str, ...]  # accepted relative paths, searched in order; names[0] is where a download goes
    url: str | None = None  # canonical source; None = local only


NO_ENVIRONMENT = Environment()


def search_roots(data_dir: str | Path | None, env: Environment = NO_ENVIRONMENT) -> list[Path]:
    """The folders searched, in order. A folder that is named but missing is an error: a typo in
    --data_dir must not silently fall through to another copy or a download."""
    roots = []
    for value, origin in ((data_dir, "--data_dir"), (env.data_dir, "KEDIT_DATA_DIR")):
        if value is None or value == "":
            continue
        path = Path(value).expanduser()
        if not path.is_dir():
            raise DataError(f"{origin} '{path}' is not a folder")
        roots.append(path)
    roots.append(env.downloads)
    return roots


def find_local(spec: DataFile, data_dir: str | Path | None = None, env: Environment = NO_ENVIRONMENT) -> Path | None:
    for root in search_roots(data_dir, env):
        for name in spec.names:
            if (root / name).is_file():
                return root / name
    return None


def missing_error(spec: DataFile, data_dir: str | Path | None, reason: str, env: Environment = NO_ENVIRONMENT) -> DataError:
    looked = ", ".join(str(root) for root in search_roots(data_dir, env))
    return DataError(
        f"{spec.what}: no local copy of {spec.names[0]} (looked in {looked}) and {reason}; "
        f"place the file at <--data_dir or $KEDIT_DATA_DIR>/{spec.names[0]} or at {env.downloads / spec.names[0]}"
    )


def locate(spec: DataFile, data_dir: str | Path | None = None, env: Environment = NO_ENVIRONMENT) -> Path:
    """The path of a data file: a local copy, else a fresh download, else a DataError."""
    found = find_local(spec, data_dir, env)
    if found is not None:
        return found
    if spec.url is None:
        raise missing_error(spec, data_dir, "it has no download URL", env)
    if not online(urlparse(spec.url).hostname or "", offline=env.offline):
        raise missing_error(spec, data_dir, f"offline, so it could not be downloaded from {spec.url}", env)
    return download(spec.url, env.downloads / spec.names[0], spec, data_dir, env)


def download(url: str, dest: Path, spec: DataFile, data_dir: str | Path | None = None, env: Environment = NO_ENVIRONMENT) -> Path:
    """Fetch `url` to `dest` through a temporary file; only a complete, parseable file is renamed
    into place, so an interrupted or captive-portal download never looks like data."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    log.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, tmp.open("wb") as out:
            shutil.copyfileobj(response, out)
        check_parses(tmp, jsonl=dest.suffix == ".jsonl")
    except (urllib.error.URLError, OSError, ValueError) as err:
        tmp.unlink(missing_ok=True)
        reason = str(getattr(err, "reason", err)).splitlines()[0] if str(err) else type(err).__name__
        raise missing_error(spec, data_dir, f"downloading {url} failed ({reason})", env) from None
    os.replace(tmp, dest)
    return dest


def check_parses(path: Path, jsonl: bool) -> None:
    """Raise ValueError unless the file is JSON (or JSON lines)."""
    with path.open(encoding="utf-8") as handle:
        if jsonl:
            for line in handle:
                if line.strip():
                    json.loads(line)
        else:
            json.load(handle)


# Held-out text for perplexity: WikiText-2 (raw) test split, local only (no canonical single-file URL).
WIKITEXT = DataFile("WikiText-2 raw test", ("wiki/wikitext-2-raw-test.txt", "wikitext-2-raw-test.txt"))
