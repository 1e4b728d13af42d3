"""Downstream probe sets (sst2, mrpc, cola, rte, mmlu, nli) for measuring what edits cost.

Each task is scored few-shot: a prompt of solved examples followed by the test example, and the
label whose word (" positive", " no", " B", ...) is most likely after it wins. Files are JSONL in
the layout of the shared reference data (glue/<task>.jsonl); the first 10 items are the few-shot
pool, the rest are test items. Labels follow GLUE: SST-2 1 = positive, CoLA 1 = acceptable,
MRPC 1 = equivalent, RTE 0 = entailment (nli's "entailment"/"not_entailment" map the same way).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data.download import NO_ENVIRONMENT, DataFile, find_local, missing_error
from data.fields import get_int, get_str, get_str_list, read_jsonl
from util.environment import Environment, online
from util.errors import DataError
from util.sampling import seeded_sample

log = logging.getLogger(__name__)

FEW_SHOT_POOL = 10
NLI_LABELS = ("entailment", "not_entailment")  # index = label, as RTE's 0 = entailment


@dataclass(frozen=True)
class ProbeExample:
    texts: tuple[str, ...]  # sst2/cola: (sentence,); mrpc/rte/nli: (sentence1, sentence2); mmlu: (question, A, B, C, D)
    label: int  # index into the task's label_words
    topic: str = ""  # MMLU subject


def texts_of(record: dict, keys: tuple[str, ...], where: str) -> tuple[str, ...]:
    # Stripped: SST-2 sentences end in a space and some MMLU questions in a newline, which
    # would otherwise leave uneven gaps in the prompt.
    return tuple(get_str(record, key, where).strip() for key in keys)


def single(record: dict, where: str, labels: int) -> ProbeExample:
    return ProbeExample(texts_of(record, ("sentence",), where), get_int(record, "label", where, range(labels)))


def pair(record: dict, where: str, labels: int) -> ProbeExample:
    texts = texts_of(record, ("sentence1", "sentence2"), where)
    return ProbeExample(texts, get_int(record, "label", where, range(labels)))


def nli_pair(record: dict, where: str, labels: int) -> ProbeExample:
    texts = texts_of(record, ("sentence1", "sentence2"), where)
    label = get_str(record, "label", where)
    if label not in NLI_LABELS:
        raise DataError(f"{where}: field 'label' must be one of {', '.join(NLI_LABELS)}, got {label!r}")
    return ProbeExample(texts, NLI_LABELS.index(label))


def multiple_choice(record: dict, where: str, labels: int) -> ProbeExample:
    choices = get_str_list(record, "choices", where)
    if len(choices) != labels:
        raise DataError(f"{where}: field 'choices' must hold {labels} options, got {len(choices)}")
    texts = (*texts_of(record, ("question",), where), *(c.strip() for c in choices))
    topic = record.get("subject", "")
    return ProbeExample(texts, get_int(record, "answer", where, range(labels)), topic if isinstance(topic, str) else "")


@dataclass(frozen=True)
class ProbeTask:
    name: str
    label_words: tuple[str, ...]  # label_words[label]; scored after the prompt with a leading space
    instruction: str  # first line of a few-shot prompt
    template: str  # str.format over example.texts; ends where the label word follows
    parse: Callable[[dict, str, int], ProbeExample]
    hub: tuple[str, str, str]  # Hugging Face datasets (path, config, split) used when no local file


RTE_TEMPLATE = "Premise: {0}\nHypothesis: {1}\nDoes the premise entail the hypothesis? Answer:"

PROBE_TASKS: dict[str, ProbeTask] = {
    t.name: t
    for t in (
        ProbeTask("sst2", ("negative", "positive"), "Classify the sentiment of each movie review as positive or negative.",
                  "Review: {0}\nSentiment:", single, ("nyu-mll/glue", "sst2", "validation")),
        ProbeTask("cola", ("unacceptable", "acceptable"), "Judge whether each sentence is grammatically acceptable or unacceptable.",
                  "Sentence: {0}\nAnswer:", single, ("nyu-mll/glue", "cola", "validation")),
        ProbeTask("mrpc", ("no", "yes"), "Decide whether the two sentences are paraphrases of each other.",
                  "Sentence 1: {0}\nSentence 2: {1}\nDo both sentences mean the same thing? Answer:", pair,
                  ("nyu-mll/glue", "mrpc", "validation")),
        ProbeTask("rte", ("yes", "no"), "Decide whether the premise entails the hypothesis.", RTE_TEMPLATE, pair,
                  ("nyu-mll/glue", "rte", "validation")),
        # The reference nli.jsonl holds RTE training pairs with string labels.
        ProbeTask("nli", ("yes", "no"), "Decide whether the premise entails the hypothesis.", RTE_TEMPLATE, nli_pair,
                  ("nyu-mll/glue", "rte", "train")),
        ProbeTask("mmlu", ("A", "B", "C", "D"), "The following are multiple choice questions (with answers).",
                  "Question: {0}\nA. {1}\nB. {2}\nC. {3}\nD. {4}\nAnswer:", multiple_choice, ("cais/mmlu", "all", "test")),
    )
}


@dataclass(frozen=True)
class ProbeSet:
    task: ProbeTask
    few_shot: tuple[ProbeExample, ...]  # the pool solved examples are drawn from
    test: tuple[ProbeExample, ...]
    source: str  # the file read

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def label_words(self) -> tuple[str, ...]:
        return self.task.label_words

    def format(self, example: ProbeExample, with_answer: bool = False) -> str:
        """One example; with its answer it reads "...Answer: yes"."""
        text = self.task.template.format(*example.texts)
        return f"{text} {self.task.label_words[example.label]}" if with_answer else text

    def prompt(self, example: ProbeExample, n_shots: int | None = None) -> str:
        """Instruction, the first `n_shots` pool examples with answers (all when None), then
        `example` without its answer; a scorer appends " " + each label word."""
        shots = self.few_shot if n_shots is None else self.few_shot[:n_shots]
        blocks = [self.task.instruction, *(self.format(s, with_answer=True) for s in shots), self.format(example)]
        return "\n\n".join(blocks)


def probe_file(task: str) -> DataFile:
    return DataFile(f"probe set '{task}'", (f"glue/{task}.jsonl", f"{task}.jsonl"))


def read_probe(task: str, path: str | Path, limit: int | None = None, seed: int = 0) -> ProbeSet:
    """A probe set from one JSONL file. With `limit`, a seeded sample of the test items (kept in
    file order), so runs with the same seed score the same items."""
    spec = probe_task(task)
    path = Path(path)
    examples = [spec.parse(record, f"{path}: item {i}", len(spec.label_words)) for i, record in enumerate(read_jsonl(path))]
    if len(examples) <= FEW_SHOT_POOL:
        raise DataError(f"{path}: {len(examples)} items; need more than the {FEW_SHOT_POOL} of the few-shot pool")
    test = examples[FEW_SHOT_POOL:]
    if limit is not None:
        test = seeded_sample(test, limit, seed)
    return ProbeSet(spec, tuple(examples[:FEW_SHOT_POOL]), tuple(test), str(path))


def load_probe(task: str, data_dir: str | Path | None = None, limit: int | None = None, seed: int = 0,
               env: Environment = NO_ENVIRONMENT) -> ProbeSet:
    """Probe set `task` from a local file (data_dir, $KEDIT_DATA_DIR, data/downloads), else from
    the Hugging Face hub when online (saved to data/downloads in the same JSONL layout)."""
    spec = probe_task(task)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    file = probe_file(task)
    path = find_local(file, data_dir, env)
    if path is None:
        if not online(offline=env.offline):
            raise missing_error(file, data_dir, "offline, so it could not be fetched from the Hugging Face hub "
                                f"({'/'.join(spec.hub[:2])})", env)
        path = fetch_from_hub(spec, env.downloads / file.names[0], file, data_dir, env)
    return read_probe(task, path, limit, seed)


def fetch_from_hub(spec: ProbeTask, dest: Path, file: DataFile, data_dir: str | Path | None, env: Environment) -> Path:
    """Full hub split rewritten as our JSONL layout. Note: the reference files are class-balanced
    subsets; a hub split is not, and its first 10 items become the few-shot pool."""
    hub_path, config, split = spec.hub
    log.warning("probe set '%s' not found locally: fetching %s/%s %s from the Hugging Face hub", spec.name, hub_path, config, split)
    try:
        from datasets import load_dataset

        rows = load_dataset(hub_path, config, split=split)
    except Exception as err:  # the hub client raises many unrelated types; report one line
        raise missing_error(file, data_dir, f"fetching {hub_path}/{config} failed ({str(err).splitlines()[0] if str(err) else type(err).__name__})", env) from None
    keys = ("question", "subject", "choices", "answer") if spec.name == "mmlu" else ("sentence", "sentence1", "sentence2", "label")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for row in rows:
                record = {k: row[k] for k in keys if k in row}
                if spec.name == "nli":  # GLUE RTE's integer label -> the nli file's string label
                    record["label"] = NLI_LABELS[record["label"]]
                out.write(json.dumps(record) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written file that looks like data
        raise
    os.replace(tmp, dest)
    return dest


def probe_task(task: str) -> ProbeTask:
    if task not in PROBE_TASKS:
        raise DataError(f"unknown probe task '{task}'; choose from {', '.join(PROBE_TASKS)}")
    return PROBE_TASKS[task]
