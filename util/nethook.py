"""Tracing: capture a module's input/output, edit its output, stop the forward pass after it.

Every context manager registers its hooks on enter and removes exactly its own handles in
`finally`, also when the forward pass raises. Stopping is done by raising `StopForward` from the
hook; the context manager that asked for the stop swallows it on exit.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch

EditFn = Callable[[Any, str], Any]  # (output, module name) -> new output


class StopForward(Exception):
    """Raised inside a hook to end the forward pass once the traced module has run."""


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output: transformers 5 decoder layers return a bare
    tensor for some models and a tuple (hidden, ...) for others; never index blindly."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """`output` with its hidden-state tensor replaced, keeping the container type."""
    if isinstance(output, (tuple, list)):
        return type(output)([hidden, *output[1:]])
    return hidden


def add_to_output(delta_fn: Callable[[torch.Tensor], torch.Tensor]) -> EditFn:
    """An edit function that adds `delta_fn(hidden)` to a module's hidden output."""

    def edit(output: Any, _name: str) -> Any:
        hidden = hidden_of(output)
        return with_hidden(output, hidden + delta_fn(hidden))

    return edit


def replace_output(value_fn: Callable[[torch.Tensor], torch.Tensor]) -> EditFn:
    """An edit function that replaces a module's hidden output by `value_fn(hidden)` (UltraEdit:
    a leaf whose gradient is read)."""

    def edit(output: Any, _name: str) -> Any:
        return with_hidden(output, value_fn(hidden_of(output)))

    return edit


class Trace(contextlib.AbstractContextManager):
    """Hook one named module.

    with Trace(model, "model.layers.3.mlp.down_proj", retain_input=True, stop=True) as t:
        model(input_ids)
    t.input, t.output  # captured tensors (detached unless detach=False)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
    ):
        self.name = name
        self.input: torch.Tensor | None = None
        self.output: Any = None
        self._module = model.get_submodule(name)
        self._retain_input, self._retain_output = retain_input, retain_output
        self._edit, self._stop, self._detach = edit_output, stop, detach
        self._handle = None

    def _keep(self, value: Any) -> Any:
        if self._detach and isinstance(value, torch.Tensor):
            return value.detach()
        return value

    def _hook(self, _module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if self._retain_input:
            self.input = self._keep(args[0] if args else None)
        if self._edit is not None:
            output = self._edit(output, self.name)
        if self._retain_output:
            self.output = self._keep(hidden_of(output))
        if self._stop:
            raise StopForward(self.name)
        return output

    def __enter__(self) -> "Trace":
        self._handle = self._module.register_forward_hook(self._hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class TraceDict(dict, contextlib.AbstractContextManager):
    """Hook several modules at once; `stop=True` ends the forward pass after the last of them
    to run (all requested modules have then been traced)."""

    def __init__(
        self,
        model: torch.nn.Module,
        names: Iterable[str],
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
    ):
        super().__init__()
        self._names = list(dict.fromkeys(names))
        self._pending: set[str] = set()
        self._stop = stop
        for name in self._names:
            self[name] = Trace(model, name, retain_input, retain_output, edit_output, False, detach)

    def __enter__(self) -> "TraceDict":
        self._pending = set(self._names)
        handles = []
        try:
            for name, trace in self.items():
                trace.__enter__()
                if self._stop:
                    module = trace._module
                    handles.append(module.register_forward_hook(self._stop_hook(name)))
        except BaseException:
            self._close(handles)
            raise
        self._stop_handles = handles
        return self

    def _stop_hook(self, name: str):
        def hook(_module, _args, _output):
            self._pending.discard(name)
            if not self._pending:
                raise StopForward(name)

        return hook

    def _close(self, handles) -> None:
        for handle in handles:
            handle.remove()
        for trace in self.values():
            trace.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._close(getattr(self, "_stop_handles", []))
        self._stop_handles = []
        return exc_type is not None and issubclass(exc_type, StopForward)
