"""Edit datasets: real files load with the right fields, bad records fail in one line naming the
file and case, and data files are found in the documented order."""
import dataclasses
import json
import shutil

import pytest

from data.cases import load_cases, read_cases, select_cases
from data.download import DataFile, locate
from util.environment import Environment
from util.errors import DataError, KeditError, RequestError
from util.paths import PROJECT_ROOT


@pytest.fixture
def env(tmp_path_factory) -> Environment:
    """The environment a command line reads, offline and with an empty download folder: no
    developer's KEDIT_DATA_DIR or data/downloads copy may decide what a test finds."""
    return Environment(download_dir=str(tmp_path_factory.mktemp("downloads")), offline=True)


# ---- real files ------------------------------------------------------------------------------

def test_counterfact_loads_original_schema(shared_data):
    cases = load_cases("cf", data_dir=shared_data)
    assert len(cases) == 1225 and len({c.case_id for c in cases}) == 1225
    first = cases[0].request
    assert (first.case_id, first.prompt, first.subject) == (18, "{}, created by", "Porsche 911")
    assert (first.target_new, first.target_true) == ("Honda", "Porsche")
    for case in cases:
        assert case.source == "cf" and case.request.prompt.count("{}") == 1
        assert len(case.paraphrase_prompts) == 2 and len(case.attribute_prompts) == 10
        assert len(case.generation_prompts) == 10
        # CounterFact's neighbourhood prompts keep the edited fact's true answer
        assert len(case.neighborhood) == 10 and {a for _, a in case.neighborhood} == {case.request.target_true}
    assert cases[0].neighborhood[0] == ("Porsche RS Spyder is produced by", "Porsche")


@pytest.mark.parametrize("ds_name, count", [("flat_cf", 1919), ("flat_cf_train", 10000)])
def test_flat_counterfact_loads_with_templated_prompts(shared_data, ds_name, count):
    cases = load_cases(ds_name, data_dir=shared_data)
    assert len(cases) == count
    for case in cases:
        request = case.request
        assert request.prompt.count("{}") == 1 and request.subject in request.text
        assert len(case.paraphrase_prompts) == 1 and len(case.neighborhood) == 1
    if ds_name == "flat_cf":
        first = cases[0]
        assert (first.case_id, first.request.prompt, first.request.subject) == (10, "{}, by", "BBC One")
        assert (first.request.target_new, first.request.target_true) == ("Sega", "BBC")
        assert first.neighborhood == (("BBC Radio, by", "BBC"),)


def test_cf_flat_is_the_original_records_then_flat_records_of_other_facts(shared_data):
    """AlphaEdit's 2,000 CounterFact edits from the shared copy: its 1,225 original-schema records
    (generation prompts), then flat train records; a fact in both layouts (same case id) once."""
    original = load_cases("cf", data_dir=shared_data)
    selection = select_cases("cf_flat", data_dir=shared_data, limit=2000)
    cases, ids = selection.cases, {c.case_id for c in original}
    assert len(cases) == 2000 and len({c.case_id for c in cases}) == 2000
    assert [c.case_id for c in cases[:1225]] == [c.case_id for c in original] and {c.source for c in cases[:1225]} == {"cf"}
    assert {c.source for c in cases[1225:]} == {"flat_cf_train"} and not ids & {c.case_id for c in cases[1225:]}
    flat = [c for c in load_cases("flat_cf_train", data_dir=shared_data) if c.case_id not in ids]
    assert [c.case_id for c in cases[1225:]] == [c.case_id for c in flat[:775]]  # 205 flat records are facts of the 1,225
    assert set(selection.files) == {"cases", "cases:flat_cf_train"}
    assert selection.files["cases:flat_cf_train"].name == "counterfact-train.json"


def test_cf_flat_reads_the_flat_file_only_when_it_needs_it(tmp_path, env):
    write_cf(tmp_path, "counterfact/counterfact.json", 7)
    selection = select_cases("cf_flat", data_dir=tmp_path, limit=1, env=env)  # the flat file is absent
    assert [c.case_id for c in selection.cases] == [7] and list(selection.files) == ["cases"]
    with pytest.raises(DataError, match="no download URL.*counterfact/flat/counterfact-train.json"):
        select_cases("cf_flat", data_dir=tmp_path, limit=2, env=env)


def test_zsre_loads_mend_layout(shared_data):
    selection = select_cases("zsre", data_dir=shared_data)
    cases = selection.cases
    assert len(selection.skipped) == 29  # alt == answers[0]: no edit to make (see select_cases)
    assert sorted([c.case_id for c in cases] + selection.skipped) == list(range(1037))
    assert all(c.request.target_new != c.request.target_true for c in cases)
    first = cases[0]
    assert first.request.prompt == "When was the inception of {}?"
    assert (first.request.target_new, first.request.target_true) == ("2006", "1998")  # alt, answers[0]
    assert first.paraphrase_prompts == ("When was the IAAF Combined Events Challenge launched?",)
    assert first.neighborhood == (("nq question: what is the name of the last episode of spongebob", "The String"),)
    assert all(c.neighborhood[0][0].startswith("nq question: ") for c in cases)


def test_limit_takes_the_first_records(shared_data):
    full = load_cases("cf", data_dir=shared_data)
    assert load_cases("cf", data_dir=shared_data, limit=5) == full[:5]
    assert len(load_cases("zsre", data_dir=shared_data, limit=5000)) == 1037 - 29
    with pytest.raises(DataError, match="limit"):
        load_cases("cf", data_dir=shared_data, limit=0)


def test_demo_edits_load():
    cases = load_cases("custom", custom_path=PROJECT_ROOT / "data" / "demo_edits.yaml")
    assert len(cases) >= 15 and len({c.case_id for c in cases}) == len(cases)
    assert len({c.request.subject for c in cases}) == len(cases)  # one edit per subject: batches don't collide
    for case in cases:
        assert case.source == "custom:demo_edits.yaml"
        assert case.request.target_true and case.request.target_true != case.request.target_new
        assert 1 <= len(case.paraphrase_prompts) <= 2 and 1 <= len(case.neighborhood) <= 2


def test_custom_json_equals_yaml(tmp_path):
    records = [{"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome", "target_true": "Paris",
                "paraphrase_prompts": ["France's capital is"], "neighborhood": [{"prompt": "The capital of Spain is", "answer": "Madrid"}]}]
    (tmp_path / "e.json").write_text(json.dumps(records))
    (tmp_path / "e.yaml").write_text(
        "- prompt: 'The capital of {} is'\n  subject: France\n  target_new: Rome\n  target_true: Paris\n"
        "  paraphrase_prompts: [\"France's capital is\"]\n"
        "  neighborhood: [{prompt: The capital of Spain is, answer: Madrid}]\n")
    from_json, from_yaml = (load_cases("custom", custom_path=tmp_path / n) for n in ("e.json", "e.yaml"))
    assert [c.request for c in from_json] == [c.request for c in from_yaml]
    assert from_json[0].case_id == 0 and from_json[0].neighborhood == (("The capital of Spain is", "Madrid"),)


# ---- validation: one line naming the file and the case ---------------------------------------

def first_records(shared_data, relative, n=3):
    return json.loads((shared_data / relative).read_text())[:n]


def corrupt_cf_subject(records):
    del records[1]["requested_rewrite"]["subject"]
    return records, f"case {records[1]['case_id']}", "requested_rewrite.subject"


def corrupt_cf_target(records):
    records[2]["requested_rewrite"]["target_new"]["str"] = "  "
    return records, f"case {records[2]['case_id']}", "target_new.str"


def corrupt_cf_list(records):
    records[0]["paraphrase_prompts"] = "not a list"
    return records, f"case {records[0]['case_id']}", "paraphrase_prompts"


def corrupt_flat_subject(records):
    records[1]["subject"] = "Somebody Else"
    return records, f"case {records[1]['case_id']}", "does not contain subject"


def corrupt_flat_truth(records):
    records[0]["ground_truth"] = ""
    return records, f"case {records[0]['case_id']}", "ground_truth"


def corrupt_zsre_answers(records):
    records[2]["answers"] = []
    return records, "record 2", "answers"


def corrupt_zsre_loc(records):
    records[1]["loc"] = "who wrote hamlet"
    return records, "record 1", "nq question"


def duplicate_id(records):
    records[2]["case_id"] = records[0]["case_id"]
    return records, f"case {records[0]['case_id']}", "duplicate"


@pytest.mark.parametrize("ds_name, relative, corrupt", [
    ("cf", "counterfact/counterfact.json", corrupt_cf_subject),
    ("cf", "counterfact/counterfact.json", corrupt_cf_target),
    ("cf", "counterfact/counterfact.json", corrupt_cf_list),
    ("cf", "counterfact/counterfact.json", duplicate_id),
    ("flat_cf", "counterfact/flat/counterfact-train.json", corrupt_flat_subject),
    ("flat_cf", "counterfact/flat/counterfact-train.json", corrupt_flat_truth),
    ("zsre", "zsre/zsre_eval.json", corrupt_zsre_answers),
    ("zsre", "zsre/zsre_eval.json", corrupt_zsre_loc),
])
def test_bad_record_names_file_and_case(shared_data, tmp_path, ds_name, relative, corrupt):
    records, case, fragment = corrupt(first_records(shared_data, relative))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(KeditError) as err:
        read_cases(ds_name, path)
    message = str(err.value)
    assert "\n" not in message and f"{path}: {case}" in message and fragment in message
    records_ok = first_records(shared_data, relative)  # the uncorrupted records load
    path.write_text(json.dumps(records_ok))
    assert len(read_cases(ds_name, path)) == 3


CUSTOM_OK = "- prompt: 'The capital of {} is'\n  subject: France\n  target_new: Rome\n"


@pytest.mark.parametrize("name, text, fragment, error", [
    ("bad.json", '[{"prompt": "The capital of {} is", "subject": "France",', "not valid JSON (line 1", DataError),
    ("bad.yaml", CUSTOM_OK + "- prompt: [unclosed\n", "not valid YAML (line", DataError),
    ("bad.yaml", CUSTOM_OK + "  paraphrases: [x]\n", "record 0: unknown field(s) 'paraphrases'", DataError),
    ("bad.yaml", CUSTOM_OK.replace("Rome", "1998"), "record 0: field 'target_new' must be a non-empty string, got int 1998 (quote it", DataError),
    ("bad.yaml", CUSTOM_OK.replace("target_new: Rome\n", ""), "record 0: missing field 'target_new'", DataError),
    ("bad.yaml", CUSTOM_OK.replace("{} is", "France is").replace("France\n", "Spain\n"), "record 0: prompt", RequestError),
    ("bad.yaml", CUSTOM_OK + "  case_id: x7\n  neighborhood: [{prompt: a}]\n", "case x7: neighborhood[0]: missing field 'answer'", DataError),
    ("bad.yaml", "prompt: x\n", "expected a list of records", DataError),
    ("empty.yaml", "", "holds no records", DataError),
    ("empty.json", "[]", "holds no records", DataError),
    ("noop.yaml", CUSTOM_OK + "  target_true: Rome\n", "no usable records (1 skipped because target_new equals target_true)", DataError),
])
def test_bad_custom_file_is_one_line(tmp_path, name, text, fragment, error):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(error) as err:
        load_cases("custom", custom_path=path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path)) and fragment in str(err.value)


def test_records_asking_for_no_change_are_skipped_and_counted(tmp_path):
    path = tmp_path / "edits.yaml"
    path.write_text(CUSTOM_OK + "  target_true: Rome\n" + CUSTOM_OK.replace("France", "Spain") + "  target_true: Madrid\n"
                    + CUSTOM_OK.replace("France", "Italy") + "  target_true: Rome\n" + CUSTOM_OK.replace("France", "Peru"))
    selection = select_cases("custom", custom_path=path, limit=2)
    assert [c.request.subject for c in selection.cases] == ["Spain", "Peru"] and selection.skipped == [0, 2]


def test_unknown_dataset_and_missing_custom_path():
    with pytest.raises(DataError, match="unknown dataset 'cff'.*cf, flat_cf"):
        load_cases("cff")
    with pytest.raises(DataError, match="custom_path"):
        load_cases("custom")


# ---- where files are found -------------------------------------------------------------------

def write_cf(folder, relative, case_id):
    """A one-record CounterFact file whose case id tells which copy was read."""
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"case_id": case_id, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris",
              "target_new": {"str": "Italy"}, "target_true": {"str": "France"}},
              "paraphrase_prompts": [], "neighborhood_prompts": [], "attribute_prompts": [], "generation_prompts": []}
    path.write_text(json.dumps([record]))


def test_resolution_order_flag_then_env_then_downloads(tmp_path, env):
    flag, env_dir = tmp_path / "flag", tmp_path / "env"
    write_cf(flag, "counterfact.json", 1)  # flat layout
    write_cf(env_dir, "counterfact/counterfact.json", 2)  # reference-data layout
    write_cf(env.downloads, "counterfact/counterfact.json", 3)
    with_env_dir = Environment.read({"KEDIT_DATA_DIR": str(env_dir), "KEDIT_DOWNLOAD_DIR": env.download_dir, "HF_HUB_OFFLINE": "1"})
    assert load_cases("cf", data_dir=flag, env=with_env_dir)[0].case_id == 1
    assert load_cases("cf", env=with_env_dir)[0].case_id == 2
    assert load_cases("cf", env=env)[0].case_id == 3
    (flag / "counterfact.json").unlink()
    assert load_cases("cf", data_dir=flag, env=with_env_dir)[0].case_id == 2  # the flag's folder lacks it: fall through


def test_offline_without_copy_says_what_to_place_where(tmp_path, env):
    with pytest.raises(DataError) as err:
        load_cases("cf", data_dir=tmp_path, env=env)
    message = str(err.value)
    assert "\n" not in message and "offline" in message and "https://rome.baulab.info/data/dsets/counterfact.json" in message
    assert "counterfact/counterfact.json" in message and str(env.downloads) in message and str(tmp_path) in message
    with pytest.raises(DataError, match="no download URL.*counterfact/flat/counterfact-val.json"):
        load_cases("flat_cf", data_dir=tmp_path, env=env)


def test_named_folder_must_exist(tmp_path, env):
    with pytest.raises(DataError, match="--data_dir .* is not a folder"):
        load_cases("cf", data_dir=tmp_path / "typo", env=env)
    with pytest.raises(DataError, match="KEDIT_DATA_DIR .* is not a folder"):
        load_cases("cf", env=dataclasses.replace(env, data_dir=str(tmp_path / "typo")))


def test_download_lands_atomically_in_downloads(tmp_path, monkeypatch, shared_data, env):
    """A real urllib transfer (file:// URL) into data/downloads; a corrupt payload leaves nothing."""
    monkeypatch.setattr("data.download.online", lambda *args, **kwargs: True)
    source = tmp_path / "remote.json"
    shutil.copy(shared_data / "zsre" / "zsre_eval.json", source)
    spec = DataFile("zsRE", ("zsre/zsre_mend_eval.json", "zsre_mend_eval.json"), source.as_uri())
    got = locate(spec, env=env)
    assert got == env.downloads / "zsre" / "zsre_mend_eval.json" and got.read_bytes() == source.read_bytes()
    assert not list(got.parent.glob("*.partial"))
    assert len(read_cases("zsre", got)) == 1037

    source.write_text("<html>captive portal</html>")
    broken = DataFile("CounterFact", ("counterfact/counterfact.json",), source.as_uri())
    with pytest.raises(DataError, match="downloading .* failed"):
        locate(broken, env=env)
    assert not (env.downloads / "counterfact").exists() or not list((env.downloads / "counterfact").iterdir())
