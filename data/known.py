"""ROME's known-facts set (known_1000.json): facts about subjects, as prompts and their answers.

    facts = load_known_facts(data_dir="../shared/data")
    facts[0].prompt, facts[0].attribute    # "Vinson Massif is located in the continent of", "Antarctica"

A run scores the facts its unedited model already completes (experiments/metrics/known.py): a
general-knowledge probe that a small model passes well above chance, so that forgetting of
unrelated knowledge shows up where the GLUE probes sit at chance.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.download import NO_ENVIRONMENT, ROME_DATA, DataFile, locate
from data.fields import get_str, read_record_list
from util.environment import Environment
from util.errors import DataError

KNOWN_FACTS = DataFile("known facts", ("known/known_1000.json", "known_1000.json"), f"{ROME_DATA}/known_1000.json")


@dataclass(frozen=True)
class KnownFact:
    known_id: int
    subject: str
    prompt: str  # the subject filled in; the attribute follows it
    attribute: str
    relation_id: str


def read_known_facts(path: str | Path) -> list[KnownFact]:
    """Every record of a known_1000.json file, validated (one line naming the record otherwise)."""
    path = Path(path)
    facts, seen = [], set()
    for index, record in enumerate(read_record_list(path)):
        known_id = record.get("known_id", index)
        where = f"{path}: record {index}"
        if isinstance(known_id, bool) or not isinstance(known_id, int):
            raise DataError(f"{where}: field 'known_id' must be an integer, got {known_id!r}")
        if known_id in seen:
            raise DataError(f"{where}: duplicate known_id {known_id}")
        seen.add(known_id)
        fact = KnownFact(known_id, get_str(record, "subject", where), get_str(record, "prompt", where),
                         get_str(record, "attribute", where), str(record.get("relation_id", "")))
        if fact.subject not in fact.prompt:
            raise DataError(f"{where}: prompt {fact.prompt!r} does not contain its subject {fact.subject!r}")
        facts.append(fact)
    return facts


def known_facts_file(data_dir: str | Path | None = None, env: Environment = NO_ENVIRONMENT) -> Path:
    return locate(KNOWN_FACTS, data_dir, env)


def load_known_facts(data_dir: str | Path | None = None, env: Environment = NO_ENVIRONMENT) -> list[KnownFact]:
    return read_known_facts(known_facts_file(data_dir, env))
