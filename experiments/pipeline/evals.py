"""The measurements of a run, loaded once and applied to the model at each evaluation point.

Every method returns JSON-ready rows ("kind" says which measurement, "protocol" under which
definitions, experiments/metrics/protocols.py) with wall-clock times under "seconds", the one field that
differs between otherwise identical runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from data.download import WIKITEXT, find_local
from data.known import KnownFact, known_facts_file, read_known_facts
from data.probes import ProbeSet, load_probe
from data.records import CaseRecord
from experiments.metrics.counterfact import CaseResult, evaluate_cases, summarize
from experiments.metrics.generation import TfIdf, evaluate_generation, summarize_generation
from experiments.metrics.known import completed, probe_facts, score_known
from experiments.metrics.perplexity import perplexity
from experiments.metrics.protocols import protocol
from experiments.pipeline.run_config import RunOptions
from util.corpus import local_corpus
from util.errors import DataError
from util.files import atomic_write_json
from util.models import LoadedModel
from util.paths import Caches, sha256_file, slug
from util.sampling import seeded_sample
from util.stats_share import fingerprint

log = logging.getLogger(__name__)

TFIDF_MAX_TEXTS = 100_000


def with_generation_prompts(record: CaseRecord) -> CaseRecord:
    """Records without generation prompts (zsRE, custom) generate from their own prompts."""
    if record.generation_prompts:
        return record
    return dataclasses.replace(record, generation_prompts=(record.request.text, *record.paraphrase_prompts))


def prompt_budget(records: Sequence[CaseRecord], budget: int | None) -> list[CaseRecord]:
    """The first records of `records` with their generation prompts, `budget` prompts in all
    (None: every prompt of every record). Where some records have generation prompts and others
    not (cf_flat), only those that have them: every point of a run then generates from the same
    kind of prompt, and a fluency drop is the model's, not a change of prompts."""
    if any(record.generation_prompts for record in records):
        records = [record for record in records if record.generation_prompts]
    if budget is None:
        return [with_generation_prompts(record) for record in records]
    chosen = []
    for record in records:
        if budget <= 0:
            break
        record = with_generation_prompts(record)
        chosen.append(dataclasses.replace(record, generation_prompts=record.generation_prompts[:budget]))
        budget -= len(chosen[-1].generation_prompts)
    return chosen


def corpus_tfidf(path: str | None, caches: Caches) -> TfIdf | None:
    """TF-IDF fitted on the local statistics corpus (--corpus or $KEDIT_CORPUS), cached as JSON."""
    if not path:
        log.warning("no local corpus (--corpus or $KEDIT_CORPUS): generation consistency is skipped")
        return None
    corpus = local_corpus(path, caches)
    cached = caches.tfidf / f"{corpus.ident}-max{TFIDF_MAX_TEXTS}.json"
    if cached.is_file():
        return TfIdf.load(cached)
    log.info("fitting TF-IDF on %s (once; cached in %s)", path, cached)
    texts = (text for i, text in zip(range(TFIDF_MAX_TEXTS), corpus.texts()))
    tfidf = TfIdf.fit(texts)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + ".partial")
    tfidf.save(tmp)
    os.replace(tmp, cached)
    return tfidf


def known_to_model(lm: LoadedModel, path: Path, caches: Caches) -> tuple[list[KnownFact], int]:
    """The facts of the known-facts file `path` that the model, as it is now, completes, and the
    number of facts in the file; cached per model (its name and a fingerprint of its embeddings
    and first layer), dtype, device and file content."""
    facts = read_known_facts(path)
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    device = next(lm.model.parameters()).device.type
    cached = caches.known / f"{slug(lm.name)}-{fingerprint(lm, 0)[:16]}-{dtype}-{device}-{sha256_file(path)[:16]}.json"
    if cached.is_file():
        ids = set(json.loads(cached.read_text())["known_ids"])
    else:
        log.info("known facts: finding the %d facts of %s the unedited model completes (once; cached in %s)", len(facts), path, cached)
        ids = {f.known_id for f, done in zip(facts, completed(lm, facts)) if done}
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cached, {"model": lm.name, "file": str(path), "n_facts": len(facts), "known_ids": sorted(ids)})
    return [f for f in facts if f.known_id in ids], len(facts)


class EvalSuite:
    def __init__(self, lm: LoadedModel, options: RunOptions, edited_subjects: Sequence[str] = ()):
        """Loads every measurement's data; the known-facts probe keeps the facts the model completes
        now (before any edit), none about `edited_subjects`."""
        self.lm, self.options = lm, options
        self.protocol = protocol(options.protocol)
        self.probes: list[ProbeSet] = [self.load_probe(task) for task in options.downstream_tasks]
        self.wikitext: Path | None = find_local(WIKITEXT, options.data_dir, options.environment)
        if self.wikitext is None:
            log.warning("%s not found (--data_dir, $KEDIT_DATA_DIR, data/downloads): perplexity is skipped", WIKITEXT.names[0])
        self.tfidf = corpus_tfidf(options.corpus, options.environment.caches) if options.generation_test_interval else None
        self.known_file: Path | None = None
        self.known: list[KnownFact] = []
        self.n_known = self.n_known_file = 0
        if options.known_facts:
            try:
                self.known_file = known_facts_file(options.data_dir, options.environment)
            except DataError as err:
                log.warning("the known-facts probe is skipped: %s", err)
        if self.known_file is not None:
            known, self.n_known_file = known_to_model(lm, self.known_file, options.environment.caches)
            self.n_known = len(known)
            self.known = probe_facts(known, edited_subjects, options.known_facts, options.seed)

    def known_config(self) -> dict[str, Any] | None:
        """What config.json records of the known-facts probe."""
        if self.known_file is None:
            return None
        return {"file_facts": self.n_known_file, "completed_unedited": self.n_known, "scored": len(self.known),
                "known_ids": [f.known_id for f in self.known]}

    def load_probe(self, task: str) -> ProbeSet:
        """The protocol's test items: a seeded sample, or the first n in file order."""
        n = self.options.number_of_tests
        if self.protocol.probe_items == "first":
            probe = load_probe(task, self.options.data_dir, env=self.options.environment)
            return dataclasses.replace(probe, test=probe.test[:n])
        return load_probe(task, self.options.data_dir, n, self.options.seed, self.options.environment)

    def data_files(self) -> dict[str, str]:
        files = {f"probe:{p.name}": p.source for p in self.probes}
        if self.known_file is not None:
            files["known_facts"] = str(self.known_file)
        if self.wikitext is not None:
            files["perplexity"] = str(self.wikitext)
        return files

    def counterfact(self, records: Sequence[CaseRecord]) -> tuple[dict[str, Any], list[CaseResult]]:
        results = evaluate_cases(self.lm, records)
        return {"protocol": self.protocol.name, **summarize(results)}, results

    def probe_rows(self, n_edits: int) -> list[dict[str, Any]]:
        rows = []
        for probe in self.probes:
            start = time.perf_counter()
            result = self.protocol.score_probe(self.lm, probe, self.options)
            row = {"kind": "probe", "protocol": self.protocol.name, "n_edits": n_edits, **result.to_dict(), "n_items": len(result.gold)}
            rows.append({**row, "seconds": time.perf_counter() - start})
        return rows

    def known_row(self, n_edits: int) -> dict[str, Any] | None:
        """The known-facts probe: the fraction of the run's known facts the model still completes."""
        if not self.known:
            return None
        start = time.perf_counter()
        result = score_known(self.lm, self.known)
        return {"kind": "known", "protocol": self.protocol.name, "n_edits": n_edits, **result.to_dict(),
                "completed_unedited": self.n_known, "file_facts": self.n_known_file, "seconds": time.perf_counter() - start}

    def perplexity_row(self, n_edits: int) -> dict[str, Any] | None:
        if self.wikitext is None:
            return None
        start = time.perf_counter()
        result = perplexity(self.lm, self.wikitext, n_tokens=self.options.perplexity_tokens)
        return {"kind": "perplexity", "protocol": self.protocol.name, "n_edits": n_edits, **result.to_dict(),
                "seconds": time.perf_counter() - start}

    def generation_row(self, records: Sequence[CaseRecord], n_edits: int, every_prompt: bool = False) -> dict[str, Any]:
        """Fluency and consistency of continuations of generation prompts of the first records
        (options.generation_prompts in all), or with every_prompt of every record, or of a seeded
        sample of options.final_generation_sample records; the sampling seed follows the position,
        so a resumed run draws the same texts."""
        start = time.perf_counter()
        records = prompt_budget(records, None if every_prompt else self.options.generation_prompts)
        sample = every_prompt and 0 < self.options.final_generation_sample < len(records)
        if sample:
            records = seeded_sample(records, self.options.final_generation_sample, self.options.seed)
        results = evaluate_generation(
            self.lm, records, self.tfidf, max_new_tokens=self.options.generation_tokens, seed=self.options.seed + n_edits,
            total_length=self.protocol.generation_length, clean=self.protocol.clean_text,
        )
        summary = summarize_generation(results)
        samples = [{"case_id": r.case_id, "texts": list(r.texts), "fluency": r.fluency, "consistency": r.consistency} for r in results]
        return {"kind": "generation", "protocol": self.protocol.name, "n_edits": n_edits,
                "scope": "sample" if sample else "all" if every_prompt else "latest", "facts": len(records),
                **summary, "samples": samples, "seconds": time.perf_counter() - start}
