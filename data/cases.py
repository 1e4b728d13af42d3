"""Edit-evaluation datasets as `CaseRecord`s: CounterFact (original and flattened, and the two in turn:
cf_flat), zsRE, custom.

    load_cases("cf", data_dir="../shared/data", limit=100)
    load_cases("custom", custom_path="data/demo_edits.yaml")

Every record is validated where it enters: a missing or wrong-typed field, a prompt without its
subject, an empty target or a duplicate case id raises DataError/RequestError with one line that
names the file and the case.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from data.download import NO_ENVIRONMENT, ROME_DATA, DataFile, locate
from data.fields import get_obj, get_str, get_str_list, read_record_list, reject_unknown
from data.records import CaseRecord
from util.environment import Environment
from util.errors import DataError
from util.requests import make_request

log = logging.getLogger(__name__)

Parser = Callable[[dict, "str | int", str, str], CaseRecord]  # (record, case_id, where, source)


def parse_counterfact(record: dict, case_id: str | int, where: str, source: str) -> CaseRecord:
    """ROME's schema; neighbourhood prompts are about other subjects whose answer is target_true."""
    rewrite = get_obj(record, "requested_rewrite", where)
    prefix = "requested_rewrite."
    request = make_request({
        "prompt": get_str(rewrite, "prompt", where, prefix),
        "subject": get_str(rewrite, "subject", where, prefix),
        "target_new": get_str(get_obj(rewrite, "target_new", where, prefix), "str", where, prefix + "target_new."),
        "target_true": get_str(get_obj(rewrite, "target_true", where, prefix), "str", where, prefix + "target_true."),
        "case_id": case_id,
    }, where)
    return CaseRecord(
        request=request,
        paraphrase_prompts=get_str_list(record, "paraphrase_prompts", where),
        neighborhood=tuple((p, request.target_true) for p in get_str_list(record, "neighborhood_prompts", where)),
        attribute_prompts=get_str_list(record, "attribute_prompts", where),
        generation_prompts=get_str_list(record, "generation_prompts", where),
        source=source,
    )


def parse_flat_counterfact(record: dict, case_id: str | int, where: str, source: str) -> CaseRecord:
    """The editing toolkits' flattened CounterFact: the prompt has the subject filled in."""
    request = make_request({
        "prompt": get_str(record, "prompt", where),
        "subject": get_str(record, "subject", where),
        "target_new": get_str(record, "target_new", where),
        "target_true": get_str(record, "ground_truth", where),
        "case_id": case_id,
    }, where)
    neighbour = (get_str(record, "locality_prompt", where), get_str(record, "locality_ground_truth", where))
    return CaseRecord(request, (get_str(record, "rephrase_prompt", where),), (neighbour,), source=source)


def parse_zsre(record: dict, case_id: str | int, where: str, source: str) -> CaseRecord:
    """MEND's zsRE layout: the edit is the question `src` -> `alt`; the true answer is answers[0];
    the neighbourhood is one Natural Questions item (loc, loc_ans)."""
    answers = get_str_list(record, "answers", where, non_empty=True)
    request = make_request({
        "prompt": get_str(record, "src", where),
        "subject": get_str(record, "subject", where),
        "target_new": get_str(record, "alt", where),
        "target_true": answers[0],
        "case_id": case_id,
    }, where)
    loc = get_str(record, "loc", where)
    if not loc.startswith("nq question: "):  # as ROME/MEMIT assert: another layout was passed as zsRE
        raise DataError(f"{where}: field 'loc' should start with 'nq question: ', got {loc[:60]!r}")
    neighbour = (loc, get_str(record, "loc_ans", where))
    return CaseRecord(request, (get_str(record, "rephrase", where),), (neighbour,), source=source)


CUSTOM_FIELDS = ("case_id", "prompt", "subject", "target_new", "target_true", "paraphrase_prompts", "neighborhood")


def parse_custom(record: dict, case_id: str | int, where: str, source: str) -> CaseRecord:
    """Hand-written requests (see data/demo_edits.yaml); unknown keys are rejected."""
    reject_unknown(record, CUSTOM_FIELDS, where)
    fields = {key: get_str(record, key, where) for key in ("prompt", "subject", "target_new")}
    if "target_true" in record:
        fields["target_true"] = get_str(record, "target_true", where)
    request = make_request({**fields, "case_id": case_id}, where)
    return CaseRecord(
        request,
        get_str_list(record, "paraphrase_prompts", where, required=False),
        custom_neighborhood(record.get("neighborhood", []), where),
        source=source,
    )


def custom_neighborhood(items: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(items, list):
        raise DataError(f"{where}: field 'neighborhood' must be a list of {{prompt, answer}} objects")
    pairs = []
    for index, item in enumerate(items):
        at = f"{where}: neighborhood[{index}]"
        if not isinstance(item, dict):
            raise DataError(f"{at}: must be an object with 'prompt' and 'answer'")
        reject_unknown(item, ("prompt", "answer"), at)
        pairs.append((get_str(item, "prompt", at), get_str(item, "answer", at)))
    return tuple(pairs)


@dataclass(frozen=True)
class Dataset:
    name: str
    file: DataFile | None  # None: the path is given (custom)
    parse: Parser
    ids_required: bool  # the schema carries case ids; otherwise the record index is the id
    measures: str = ""  # what its records let a run measure (recorded in each run's config and summary)
    # A composite: the records of these datasets in turn, a case id already read (the same
    # CounterFact fact in another layout) passed over; a later file is read only when needed.
    parts: tuple[str, ...] = ()


ORIGINAL_CF = ("efficacy ES (rewrite prompt), paraphrase PS (2 paraphrases), neighbourhood NS (10 prompts about other "
               "subjects with the true answer); generation from its generation prompts, consistency against its attribute prompts")
FLAT_CF_MEASURES = ("efficacy ES (rewrite prompt), paraphrase PS (1 rephrased prompt), neighbourhood NS as locality (1 prompt "
                    "about another subject and its answer); no generation or attribute prompts: fluency from the rewrite and "
                    "paraphrase prompts, no consistency")


FLAT_CF = ("counterfact/flat/{}", "flat/{}", "{}")

DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("cf", DataFile("CounterFact", ("counterfact/counterfact.json", "counterfact.json"),
                               f"{ROME_DATA}/counterfact.json"), parse_counterfact, True, ORIGINAL_CF),
        Dataset("flat_cf", DataFile("flat CounterFact (val)", tuple(p.format("counterfact-val.json") for p in FLAT_CF)),
                parse_flat_counterfact, True, FLAT_CF_MEASURES),
        Dataset("flat_cf_train", DataFile("flat CounterFact (train)", tuple(p.format("counterfact-train.json") for p in FLAT_CF)),
                parse_flat_counterfact, True, FLAT_CF_MEASURES),
        # ROME and MEMIT publish MEND's zsRE eval split as zsre_mend_eval.json; other copies use other names.
        Dataset("zsre", DataFile("zsRE", tuple(f"{d}{n}" for d in ("zsre/", "") for n in
                                             ("zsre_mend_eval.json", "zsre_mem_eval.json", "zsre_eval.json")),
                                 f"{ROME_DATA}/zsre_mend_eval.json"), parse_zsre, False,
                "efficacy (question -> new answer), paraphrase (1 rephrased question), neighbourhood (1 Natural Questions "
                "item, its answer's argmax accuracy); no generation or attribute prompts"),
        Dataset("custom", None, parse_custom, False, "efficacy, and paraphrase / neighbourhood where the records give prompts"),
        # AlphaEdit's Table 1 edits CounterFact's first 2,000 records; the shared copy of the original
        # schema holds 1,225, so the flat layout's other facts follow (with the full file, none do).
        Dataset("cf_flat", None, parse_counterfact, True,
                f"the original-schema CounterFact records first ({ORIGINAL_CF}), then the flat CounterFact (train) records of "
                f"other facts ({FLAT_CF_MEASURES.split('; ')[0]}); fluency and consistency from the original-schema records' "
                "generation and attribute prompts only", parts=("cf", "flat_cf_train")),
    )
}


def record_id(record: dict, index: int, path: Path, required: bool) -> tuple[str | int, str]:
    """The case id and the `where` that error messages use for this record."""
    if "case_id" not in record:
        if required:
            raise DataError(f"{path}: record {index}: missing field 'case_id'")
        return index, f"{path}: record {index}"
    value = record["case_id"]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise DataError(f"{path}: record {index}: field 'case_id' must be an integer or a string, got {value!r}")
    return value, f"{path}: case {value}"


def read_cases(ds_name: str, path: str | Path) -> list[CaseRecord]:
    """Every record of one file in the schema of `ds_name`, validated; case ids must be unique
    because results are stored and resumed by case id."""
    dataset = dataset_for(ds_name)
    path = Path(path).expanduser()
    source = f"custom:{path.name}" if dataset.name == "custom" else dataset.name
    cases, first_index = [], {}
    for index, record in enumerate(read_record_list(path)):
        case_id, where = record_id(record, index, path, dataset.ids_required)
        if case_id in first_index:
            raise DataError(f"{where}: duplicate case id (records {first_index[case_id]} and {index})")
        first_index[case_id] = index
        cases.append(dataset.parse(record, case_id, where, source))
    return cases


NO_OP = "target_new equals target_true"


@dataclass(frozen=True)
class CaseSelection:
    cases: list[CaseRecord]
    skipped: list[str | int]  # case ids of records passed over because the edit would change nothing (NO_OP)
    files: dict[str, Path]  # the files read ("cases", then "cases:<dataset>" for a composite's later parts)


def _records(ds_name: str, data_dir: str | Path | None, custom_path: str | Path | None, env: Environment,
             files: dict[str, Path]) -> Iterator[CaseRecord]:
    """The records of `ds_name` in order, a composite's parts in turn (a later file is located only
    when the records before it are used up); each file read is added to `files`."""
    dataset = dataset_for(ds_name)
    seen: set[str | int] = set()
    for index, part in enumerate(dataset.parts or (ds_name,)):
        path = case_file(part, data_dir, custom_path, env)
        files["cases" if index == 0 else f"cases:{part}"] = path
        for case in read_cases(part, path):
            if case.case_id not in seen:
                seen.add(case.case_id)
                yield case


def select_cases(ds_name: str, data_dir: str | Path | None = None, limit: int | None = None,
                 custom_path: str | Path | None = None, env: Environment = NO_ENVIRONMENT) -> CaseSelection:
    """The first `limit` usable cases (all when None) of dataset `ds_name`; see data/download.py
    for where its file is looked for (`env`: the variables read at the edge). `custom_path` names
    the file for ds_name "custom".

    A record whose target_new equals its target_true asks for no change (29 of MEND's 1037 zsRE
    records do): it is skipped with a warning and its id listed in `skipped`, not edited and
    scored as a success. A file with no usable record is an error, not a run of 0 edits."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    cases, skipped, files = [], [], {}
    for case in _records(ds_name, data_dir, custom_path, env, files):
        if case.request.target_true is not None and case.request.target_new == case.request.target_true:
            skipped.append(case.case_id)
        else:
            cases.append(case)
        if len(cases) == limit:  # stop here: the next record may be in a file not needed yet
            break
    where = ", ".join(map(str, files.values()))
    if skipped:
        log.warning("%s: skipped %d record(s) whose %s (case ids %s)", where, len(skipped), NO_OP,
                    ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else ""))
    if not cases:
        raise DataError(f"{where}: no usable records ({len(skipped)} skipped because {NO_OP}): nothing to edit")
    return CaseSelection(cases, skipped, files)


def load_cases(ds_name: str, data_dir: str | Path | None = None, limit: int | None = None,
               custom_path: str | Path | None = None, env: Environment = NO_ENVIRONMENT) -> list[CaseRecord]:
    """The cases of `select_cases`."""
    return select_cases(ds_name, data_dir, limit, custom_path, env).cases


def case_file(ds_name: str, data_dir: str | Path | None = None, custom_path: str | Path | None = None,
              env: Environment = NO_ENVIRONMENT) -> Path:
    """The file `load_cases` reads for these arguments (the first, for a composite dataset)."""
    dataset = dataset_for(ds_name)
    if dataset.parts:
        return case_file(dataset.parts[0], data_dir, custom_path, env)
    if dataset.file is None:
        if custom_path is None:
            raise DataError(f"dataset '{ds_name}' needs a file: give custom_path (a YAML or JSON list of requests)")
        path = Path(custom_path).expanduser()
        if not path.is_file():
            raise DataError(f"custom edits file '{path}' does not exist")
        return path
    if custom_path is not None:
        raise DataError(f"custom_path is only used with dataset 'custom', not '{ds_name}'")
    return locate(dataset.file, data_dir, env)


def dataset_for(ds_name: str) -> Dataset:
    if ds_name not in DATASETS:
        raise DataError(f"unknown dataset '{ds_name}'; choose from {', '.join(DATASETS)}")
    return DATASETS[ds_name]
