"""Hparams: frozen dataclasses loaded from YAML, validated on load.

An unknown key, a missing key, a value of the wrong type or outside its range (`Range`, checked
by each class's validate()) fails with one line naming the file and the key. `--set key=value`
overrides are parsed as YAML scalars and checked the same way. Numbers read as YAML 1.2 does:
`1e-9`, `1E5` and `.5` are numbers (PyYAML's YAML 1.1 rules read the first two as strings).
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from util.errors import HparamsError

T = TypeVar("T")


class NumberLoader(yaml.SafeLoader):
    """safe_load plus YAML 1.2 floats: an exponent without a dot (1e-9, 1E5) makes a number."""


NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=NumberLoader)


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric hparam: low < x (or low <= x) and x <= high, finite."""

    low: float | None = None
    high: float | None = None
    low_included: bool = True

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value >= self.low if self.low_included else value > self.low)
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>=' if self.low_included else '>'} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return "a finite number " + " and ".join(parts) if parts else "a finite number"


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Range(0, low_included=False), Range(0), Range(1)


def out_of_range(hparams: Any, ranges: Mapping[str, Range]) -> str | None:
    """The first key whose value (or any element of its list value) lies outside its Range."""
    for key, allowed in ranges.items():
        value = getattr(hparams, key)
        if any(v not in allowed for v in (value if isinstance(value, list) else [value])):
            return f"key '{key}' must be {allowed}{' (each element)' if isinstance(value, list) else ''}, got {value!r}"
    return None


def layers_problem(layers: list[int], key: str = "layers") -> str | None:
    """Why a list of layer indices is unusable (empty, negative, not strictly increasing), or None."""
    if not layers:
        return f"key '{key}' must list at least one layer"
    if min(layers) < 0:
        return f"key '{key}' must be {NON_NEGATIVE} (each element), got {layers!r}"
    if sorted(layers) != layers or len(set(layers)) != len(layers):
        return f"key '{key}' must be strictly increasing, got {layers}"
    return None


def check_layers_exist(layers: list[int], n_layers: int, source: str, key: str = "layers") -> None:
    """Every index in `layers` names a layer of a model with `n_layers` layers (one line otherwise)."""
    missing = [layer for layer in layers if not 0 <= layer < n_layers]
    if missing:
        raise HparamsError(f"{source}: key '{key}': layer {missing[0]} does not exist in a model with {n_layers} layers (0-{n_layers - 1})")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_check(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_check(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(
            _check(v, a) for v, a in zip(value, args)
        )
    if origin is dict:
        return isinstance(value, dict) and all(
            _check(k, args[0]) and _check(v, args[1]) for k, v in value.items()
        )
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:  # 1E5 is read as a float: a whole number is an int
        return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    return isinstance(value, tp)


def _coerce(value: Any, tp: Any) -> Any:
    """Ints where floats are declared become floats; lists declared as tuples become tuples."""
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is int and isinstance(value, float):
        return int(value)
    if typing.get_origin(tp) is list and isinstance(value, list):
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner) for v in value]
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, YAML-typed value): '--set v_lr=0.1 --set layers=[4,5]'."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise HparamsError(f"--set '{text}': expected key=value")
    try:
        value = load_yaml(raw)
    except yaml.YAMLError:
        raise HparamsError(f"--set '{text}': value is not valid YAML") from None
    return key.strip(), value


def build_hparams(cls: type[T], values: dict[str, Any], source: str, fixed: Mapping[str, Any] | None = None) -> T:
    """Validate `values` against dataclass `cls`; `source` names the file in errors. `fixed`: keys
    the algorithm sets itself (rome/declaration.py's Editor.fixed); `values` may repeat them, not
    contradict them."""
    if not isinstance(values, dict):
        raise HparamsError(f"{source}: expected a mapping of hparams, got {type(values).__name__}")
    for key, value in (fixed or {}).items():
        if key in values and values[key] != value:
            raise HparamsError(f"{source}: key '{key}' is set by the algorithm to {value!r}, got {values[key]!r}; remove the key")
    values = {**values, **(fixed or {})}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise HparamsError(f"{source}: unknown key '{key}' for {cls.__name__}")
    kwargs = {}
    for name, field in fields.items():
        if name not in values:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise HparamsError(f"{source}: missing key '{name}' for {cls.__name__}")
            continue
        value = values[name]
        if not _check(value, hints[name]):
            raise HparamsError(
                f"{source}: key '{name}' must be {_type_name(hints[name])}, got {value!r}"
            )
        kwargs[name] = _coerce(value, hints[name])
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        problem = validate()
        if problem:
            raise HparamsError(f"{source}: {problem}")
    return instance


def load_hparams(cls: type[T], path: str | Path, overrides: Iterable[str] = (), fixed: Mapping[str, Any] | None = None) -> T:
    path = Path(path)
    if not path.is_file():
        raise HparamsError(f"hparams file '{path}' does not exist")
    try:
        values = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise HparamsError(f"{path}: not valid YAML{where}") from None
    if not isinstance(values, dict):
        raise HparamsError(f"{path}: expected a mapping of hparams, got {type(values).__name__}")
    values = dict(values)
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return build_hparams(cls, values, str(path) + (" (with --set)" if overrides else ""), fixed)


def to_dict(hparams: Any) -> dict[str, Any]:
    return dataclasses.asdict(hparams)
