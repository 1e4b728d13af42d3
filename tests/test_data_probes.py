"""Downstream probe sets: counts, GLUE label conventions, prompt formatting, seeded limits."""
import json

import pytest

from data.probes import FEW_SHOT_POOL, PROBE_TASKS, load_probe, read_probe
from util.environment import Environment
from util.errors import DataError

SIZES = {"sst2": 856, "mrpc": 258, "cola": 644, "rte": 262, "mmlu": 1516, "nli": 2489}

# The documented conventions, written independently of data/probes.py: raw file label -> word.
CONVENTION = {
    "sst2": {0: "negative", 1: "positive"},
    "cola": {0: "unacceptable", 1: "acceptable"},
    "mrpc": {0: "no", 1: "yes"},  # 1 = equivalent
    "rte": {0: "yes", 1: "no"},  # 0 = entailment
    "nli": {"entailment": "yes", "not_entailment": "no"},
    "mmlu": {0: "A", 1: "B", 2: "C", 3: "D"},
}


@pytest.fixture
def env(tmp_path_factory) -> Environment:
    """Offline, with an empty download folder (no developer's copy decides what a test finds)."""
    return Environment(download_dir=str(tmp_path_factory.mktemp("downloads")), offline=True)


def raw_items(shared_data, task):
    return [json.loads(line) for line in (shared_data / "glue" / f"{task}.jsonl").read_text().split("\n") if line.strip()]


@pytest.mark.parametrize("task", sorted(PROBE_TASKS))
def test_probe_sets_load_with_documented_labels(shared_data, task):
    probe = load_probe(task, data_dir=shared_data)
    assert probe.name == task and len(probe.few_shot) == FEW_SHOT_POOL
    assert len(probe.test) == SIZES[task] - FEW_SHOT_POOL
    raw = raw_items(shared_data, task)
    answer_key = "answer" if task == "mmlu" else "label"
    for example, record in zip((*probe.few_shot, *probe.test), raw, strict=True):
        assert probe.label_words[example.label] == CONVENTION[task][record[answer_key]]
        assert all(text == text.strip() and text for text in example.texts)
    # every label occurs among the test items (the files are class-balanced)
    assert {e.label for e in probe.test} == set(range(len(probe.label_words)))


def test_known_items_read_the_right_way_round(shared_data):
    """Spot checks a human can verify: a glowing review is positive, a stated membership is
    entailed, a garbled sentence is unacceptable."""
    sst2 = load_probe("sst2", data_dir=shared_data)
    thrilling = next(e for e in sst2.few_shot if e.texts[0] == "the film 's performances are thrilling .")
    assert sst2.format(thrilling, with_answer=True).endswith("Sentiment: positive")
    rte = load_probe("rte", data_dir=shared_data)
    member = next(e for e in rte.few_shot if e.texts[1] == "P. Prayong is a member of Theravada.")
    assert rte.label_words[member.label] == "yes"
    cola = load_probe("cola", data_dir=shared_data)
    garbled = next(e for e in cola.few_shot if e.texts[0] == "Sam gave the ball out of the basket.")
    assert cola.label_words[garbled.label] == "unacceptable"


def test_prompt_has_instruction_shots_and_unanswered_item(shared_data):
    probe = load_probe("mmlu", data_dir=shared_data, limit=3)
    item = probe.test[0]
    prompt = probe.prompt(item, n_shots=2)
    blocks = prompt.split("\n\n")
    assert blocks[0] == probe.task.instruction and len(blocks) == 4
    assert blocks[1] == probe.format(probe.few_shot[0], with_answer=True) and blocks[1].endswith(f"Answer: {probe.label_words[probe.few_shot[0].label]}")
    assert blocks[3] == probe.format(item) and prompt.endswith("\nAnswer:")
    assert item.texts[0] in blocks[3] and all(f"{letter}. " in blocks[3] for letter in "ABCD")
    assert probe.format(item, with_answer=True) == probe.format(item) + " " + probe.label_words[item.label]
    assert len(probe.prompt(item).split("\n\n")) == 2 + FEW_SHOT_POOL


def test_limit_is_a_seeded_sample_in_file_order(shared_data):
    path = shared_data / "glue" / "nli.jsonl"
    full = read_probe("nli", path).test
    first = read_probe("nli", path, limit=50, seed=3).test
    assert first == read_probe("nli", path, limit=50, seed=3).test
    assert len(first) == 50 and first != read_probe("nli", path, limit=50, seed=4).test
    positions = [full.index(e) for e in first]
    assert positions == sorted(positions) and first != full[:50]
    assert read_probe("nli", path, limit=10_000).test == full
    with pytest.raises(DataError, match="limit"):
        load_probe("nli", data_dir=shared_data, limit=0)


def test_offline_without_file_names_the_file_to_place(tmp_path, env):
    with pytest.raises(DataError) as err:
        load_probe("sst2", data_dir=tmp_path, env=env)
    message = str(err.value)
    assert "\n" not in message and "glue/sst2.jsonl" in message and str(env.downloads) in message
    assert "offline" in message and "nyu-mll/glue" in message


def test_local_copy_is_used_from_flat_layout(tmp_path, shared_data):
    (tmp_path / "rte.jsonl").write_bytes((shared_data / "glue" / "rte.jsonl").read_bytes())
    assert load_probe("rte", data_dir=tmp_path).source == str(tmp_path / "rte.jsonl")


@pytest.mark.parametrize("task, record, fragment", [
    ("sst2", {"sentence": "fine", "label": 2}, "field 'label' must be an integer in 0..1, got int 2"),
    ("sst2", {"sentence": "fine", "label": True}, "field 'label' must be an integer in 0..1, got bool"),
    ("mrpc", {"sentence1": "a", "label": 1}, "missing field 'sentence2'"),
    ("nli", {"sentence1": "a", "sentence2": "b", "label": "neutral"}, "must be one of entailment, not_entailment"),
    ("mmlu", {"question": "q", "choices": ["a", "b", "c"], "answer": 0}, "must hold 4 options"),
])
def test_bad_item_names_file_and_line(tmp_path, shared_data, task, record, fragment):
    lines = (shared_data / "glue" / f"{task}.jsonl").read_text().split("\n")[:20]
    lines[12] = json.dumps(record)
    path = tmp_path / f"{task}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_probe(task, path)
    assert "\n" not in str(err.value) and f"{path}: item 12: " in str(err.value) and fragment in str(err.value)


def test_too_small_file_and_unknown_task(tmp_path, shared_data):
    path = tmp_path / "sst2.jsonl"
    path.write_text("\n".join((shared_data / "glue" / "sst2.jsonl").read_text().split("\n")[:10]))
    with pytest.raises(DataError, match="10 items"):
        read_probe("sst2", path)
    path.write_text('{"sentence": "ok", "label": 1}\n{"sentence": \n')
    with pytest.raises(DataError, match=r"sst2.jsonl:2: not a JSON line"):
        read_probe("sst2", path)
    with pytest.raises(DataError, match="unknown probe task 'glue'"):
        load_probe("glue")
