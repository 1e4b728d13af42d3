"""Reading record files and typed fields out of their records, with one-line errors.

Every error names `where`: the file and the case id (or record index), so a bad record among
twenty thousand is found without a traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from util.errors import DataError

YAML_SUFFIXES = (".yaml", ".yml")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None


def read_structured(path: Path) -> Any:
    """A JSON or (by suffix) YAML document. YAML is read with safe_load: data, never objects."""
    text = read_text(path)
    if path.suffix.lower() in YAML_SUFFIXES:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise DataError(f"{path}: not valid YAML ({at}{problem})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def read_record_list(path: Path) -> list[dict]:
    """A file whose top level is a list of objects."""
    data = read_structured(path)
    if data is None or data == []:
        raise DataError(f"{path}: the file holds no records: nothing to edit")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records at the top level, got {type(data).__name__}")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index} is a {type(record).__name__}, not an object")
    return data


def read_jsonl(path: Path) -> list[dict]:
    records = []
    # split on "\n" only: str.splitlines() also breaks at U+2028 and friends, which JSON allows raw in strings
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _type_error(where: str, key: str, expected: str, value: Any) -> DataError:
    # YAML turns unquoted 1998, 3.5, yes/no into numbers and booleans; say how to keep a string.
    hint = " (quote it in YAML)" if isinstance(value, (bool, int, float)) and expected.endswith("string") else ""
    return DataError(f"{where}: field '{key}' must be {expected}, got {type(value).__name__} {value!r}{hint}")


def need(record: dict, key: str, where: str, prefix: str = "") -> Any:
    if key not in record:
        raise DataError(f"{where}: missing field '{prefix}{key}'")
    return record[key]


def get_str(record: dict, key: str, where: str, prefix: str = "") -> str:
    value = need(record, key, where, prefix)
    if not isinstance(value, str) or not value.strip():
        raise _type_error(where, prefix + key, "a non-empty string", value)
    return value


def get_obj(record: dict, key: str, where: str, prefix: str = "") -> dict:
    value = need(record, key, where, prefix)
    if not isinstance(value, dict):
        raise _type_error(where, prefix + key, "an object", value)
    return value


def get_str_list(record: dict, key: str, where: str, required: bool = True, non_empty: bool = False) -> tuple[str, ...]:
    if not required and key not in record:
        return ()
    value = need(record, key, where)
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _type_error(where, key, "a list of non-empty strings", value)
    if non_empty and not value:
        raise DataError(f"{where}: field '{key}' must not be an empty list")
    return tuple(value)


def get_int(record: dict, key: str, where: str, choices: range) -> int:
    value = need(record, key, where)
    # bool is an int subclass; a true/false label is a data error, not 1/0.
    if isinstance(value, bool) or not isinstance(value, int) or value not in choices:
        raise _type_error(where, key, f"an integer in {choices.start}..{choices.stop - 1}", value)
    return value


def reject_unknown(record: dict, allowed: tuple[str, ...], where: str) -> None:
    """Hand-written files: a misspelt optional key would otherwise be dropped silently."""
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
