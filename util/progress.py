"""Progress bars that read well in a terminal, in a notebook and in a log file.

Every long phase (key statistics, edits, evaluation) shows a tqdm bar made here. In a terminal it
redraws in place; in a notebook it is tqdm's widget. Where stderr is neither (redirected to a file,
a pipe, a scheduler's log), redrawing in place wrote carriage returns into the file and log lines
ran into the bar's text: there a bar writes whole lines instead, none for a phase shorter than
LOG_INTERVAL seconds, then one every LOG_INTERVAL seconds and one when it ends.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

import tqdm.autonotebook
import tqdm.std

LOG_INTERVAL = 30.0  # seconds between a bar's lines in a log
TERMINAL_DELAY = 0.5  # seconds before a bar shows in a terminal (no flicker from the many short ones)


class _Lines:
    """A file for tqdm that turns each redraw into one whole line of `stream`: carriage returns,
    cursor movements and blank-outs (what redraws a bar in place) are dropped."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line and line != self.last:  # a bar ending right after a refresh draws the same line again
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def in_notebook() -> bool:
    return tqdm.autonotebook.tqdm is not tqdm.std.tqdm


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm.std.tqdm:
    """A tqdm bar (same arguments) for where stderr goes: a terminal, a notebook or a log."""
    if terminal() or in_notebook():
        kwargs.setdefault("delay", TERMINAL_DELAY)
        return tqdm.autonotebook.tqdm(iterable, **kwargs)
    kwargs.update(file=_Lines(sys.stderr), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, delay=LOG_INTERVAL,
                  ascii=True, leave=True, dynamic_ncols=False)
    return tqdm.std.tqdm(iterable, **kwargs)


def quiet_library_bars() -> None:
    """Where stderr is a log, the bars of transformers and huggingface_hub (which redraw in
    place) are turned off; ours say what is happening. Only libraries already imported (every
    command line imports them before run_cli) are changed: none is imported for it."""
    if terminal() or in_notebook():
        return
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
