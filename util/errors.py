"""User-facing errors: each carries one line that names the file, key or record at fault.

Command-line entry points catch `KeditError` and print its message instead of a traceback.
"""


class KeditError(Exception):
    """Base class for errors caused by the user's input (files, flags, records)."""


class HparamsError(KeditError):
    pass


class ModelLoadError(KeditError):
    pass


class CorpusError(KeditError):
    pass


class RequestError(KeditError):
    pass


class DataError(KeditError):
    pass


class RunError(KeditError):
    """An invalid combination of run options, a run folder that cannot be continued, or a result
    file that cannot be written."""


class SolverError(KeditError):
    """A singular or ill-conditioned update system; names the layer and condition number."""


class MemoryBudgetError(KeditError):
    """A device memory budget (--max_gpu_memory) too small for one request; says what would fit."""


class CacheError(KeditError):
    """A cache file (statistics, null-space basis) that cannot be read; names it and how to rebuild it."""
