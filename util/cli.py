"""Shared command-line plumbing: logging set-up and one-line errors instead of tracebacks."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from util.errors import KeditError


def run_cli(main: Callable[[], int | None]) -> None:
    """Run `main`; a `KeditError` (bad file, key, record, flag) ends in one line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = main()
    except KeditError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
