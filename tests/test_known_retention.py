"""The known-facts probe (facts the unedited model completes, none about an edited subject) and
retention on a seeded sample (the same facts at every evaluation once edited, plus the latest
batch), on the tiny random Llama: what they score, what they exclude, and that a continued run
scores the same sample."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

import experiments.pipeline.evals as evals_module
from data.known import KnownFact, read_known_facts
from experiments.metrics.known import probe_facts, score_known
from experiments.pipeline.evals import known_to_model
from experiments.pipeline.run import run
from experiments.reporting.summary import current_summary, run_rows
from tests.conftest import fresh_llama
from tests.helpers import run_options, tiny_hparams
from util.errors import DataError
from util.files import read_jsonl
from util.models import LoadedModel
from util.sampling import seeded_sample


fresh = fresh_llama



SUBJECTS = ["France", "Danube", "Mozart", "Toyota", "Kyoto", "Nile", "Picasso", "Everest"]


@torch.no_grad()
def facts_the_model_completes(lm: LoadedModel) -> list[dict]:
    """known_1000.json records whose attribute is the model's greedy next word after the prompt,
    so that the random model "knows" them; the first is about France, which the demo edits."""
    records = []
    for i, subject in enumerate(SUBJECTS):
        prompt = f"{subject} is located in"
        ids = lm.tok(prompt, return_tensors="pt")["input_ids"]
        for token in lm.model(ids).logits[0, -1].argsort(descending=True).tolist():
            word = lm.tok.decode([token])
            if word.startswith(" ") and word[1:].isalpha() and lm.tok(prompt + word)["input_ids"] == ids[0].tolist() + [token]:
                break
        top = lm.model(ids).logits[0, -1].argmax().item()
        if top == token:  # the greedy token itself reads as a word: the model completes the fact
            records.append({"known_id": i, "subject": subject, "attribute": word[1:], "template": "{} is located in",
                            "prediction": word, "prompt": prompt, "relation_id": "P17"})
    return records


def write_known(folder, records) -> None:
    (folder / "known").mkdir(parents=True, exist_ok=True)
    (folder / "known" / "known_1000.json").write_text(json.dumps(records))


def test_known_facts_file_errors_name_the_record(tmp_path):
    bad = [{"known_id": 0, "subject": "Nile", "prompt": "The river flows", "attribute": "Egypt"}]
    (tmp_path / "k.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"k.json: record 0: prompt 'The river flows' does not contain its subject 'Nile'"):
        read_known_facts(tmp_path / "k.json")
    (tmp_path / "k.json").write_text(json.dumps([{**bad[0], "prompt": "The Nile flows"}, {**bad[0], "prompt": "The Nile"}]))
    with pytest.raises(DataError, match="record 1: duplicate known_id 0"):
        read_known_facts(tmp_path / "k.json")


def test_probe_excludes_edited_subjects_and_samples_with_the_seed():
    facts = [KnownFact(i, s, f"{s} is in", "X", "P1") for i, s in enumerate(["Paris", "paris ", "Rome", "Oslo", "Bern"])]
    assert [f.known_id for f in probe_facts(facts, ["PARIS"], 10, 0)] == [2, 3, 4]
    sample = probe_facts(facts, [], 3, seed=1)
    assert len(sample) == 3 and sample == probe_facts(facts, [], 3, seed=1)
    assert [f.known_id for f in sample] == sorted(f.known_id for f in sample)  # file order kept


def test_seeded_sample_keeps_order_and_is_the_draw_of_its_seed():
    items = list("abcdefghij")
    drawn = seeded_sample(items, 4, seed=7)
    assert drawn == [items[i] for i in sorted(random.Random(7).sample(range(10), 4))]  # the draw the runs recorded before
    assert drawn == seeded_sample(items, 4, seed=7) != seeded_sample(items, 4, seed=8)
    assert seeded_sample(items, 10, 0) == items == seeded_sample(items, 99, 0) and seeded_sample((), 3, 0) == []


def test_known_facts_of_a_model_are_found_once_and_scored(tokenizer, caches, tmp_path, monkeypatch):
    lm = fresh(tokenizer)
    records = facts_the_model_completes(lm)
    assert len(records) >= 3  # the fixture is meaningful: the random model completes several facts
    unknown = {"known_id": 99, "subject": "Nile", "prompt": "Nile is located in", "attribute": "zzqx", "relation_id": "P17"}
    write_known(tmp_path, [*records, unknown])
    path = tmp_path / "known" / "known_1000.json"
    known, n_file = known_to_model(lm, path, caches)
    assert [f.known_id for f in known] == [r["known_id"] for r in records] and n_file == len(records) + 1
    monkeypatch.setattr(evals_module, "completed", lambda *a: pytest.fail("recomputed despite the cache"))
    assert known_to_model(lm, path, caches)[0] == known
    result = score_known(lm, known)
    assert result.accuracy == 1.0 and result.n_items == len(known)
    assert result.chance == pytest.approx(1 / lm.model.config.vocab_size)  # one-token attributes
    torch.manual_seed(0)
    with torch.no_grad():  # a destructive edit: the model forgets what it completed
        for layer in lm.model.model.layers:
            layer.mlp.down_proj.weight.add_(torch.randn_like(layer.mlp.down_proj.weight) * 5)
    damaged = score_known(lm, known)
    assert damaged.accuracy < 1.0 and damaged.nll > result.nll


def test_run_scores_known_facts_and_a_retention_sample(tmp_path, tokenizer):
    options = run_options(tmp_path)
    records = facts_the_model_completes(fresh(tokenizer))
    write_known(tmp_path / "data", records)
    options = dataclasses.replace(options, retention_sample=2, known_facts=100)
    path = run(options, fresh(tokenizer), tiny_hparams())
    config = json.loads((path / "config.json").read_text())
    known_ids = [r["known_id"] for r in records if r["subject"] != "France"]  # France is a demo edit's subject
    assert config["known_facts"]["known_ids"] == known_ids and config["known_facts"]["completed_unedited"] == len(records)
    assert "known_facts" in config["data"]
    rows = read_jsonl(path / "probes.jsonl")
    known = [r for r in rows if r["kind"] == "known"]
    assert [r["n_edits"] for r in known] == [0, 2, 4, 5]
    assert known[0]["accuracy"] == 1.0 and known[0]["n_items"] == len(known_ids) and 0 < known[0]["chance"] < 1e-4
    sample = config["retention"]["case_ids"]
    assert config["retention"]["scope"] == "sample" and len(sample) == 2
    scored = {}
    for line in read_jsonl(path / "cases.jsonl"):
        if line["phase"] == "retention":
            scored.setdefault(line["n_edits"], []).append(line["case_id"])
    for n, ids in scored.items():  # the sampled facts edited so far, and the latest edit
        assert ids == [c for c in range(n) if c in sample or c == n - 1], n
    retention = [r for r in rows if r["kind"] == "retention"]
    assert [(r["n_cases"], r["facts_in_model"], r["scope"]) for r in retention][-1] == (len(scored[5]), 5, "sample")
    # the scores estimate the mean over every fact in the model: the latest edit counts once, each
    # sampled earlier fact for its share of the earlier facts
    facts = {(c["n_edits"], c["case_id"]): c["metrics"] for c in read_jsonl(path / "cases.jsonl")}
    differs = False
    for row in retention:
        n, earlier = row["n_edits"], [c for c in scored[row["n_edits"]] if c != row["n_edits"] - 1]
        if not earlier:
            assert row["estimate"] == "mean"
            continue
        assert row["estimate"] == "stratified"
        for score, section in (("ES", "rewrite"), ("NS", "neighborhood")):
            value = {c: facts[n, c][f"{section}_success"] for c in scored[n]}
            expected = (value[n - 1] + (n - 1) / len(earlier) * sum(value[c] for c in earlier)) / n
            assert row[score] == pytest.approx(expected), (n, score)
            assert row["unweighted"][score] == pytest.approx(sum(value.values()) / len(value))
            differs |= row[score] != pytest.approx(row["unweighted"][score])
    assert differs  # the weights change a score here
    assert "5 facts in the model, the scores estimated over all of them" in (path / "summary.md").read_text()
    # a run written before the estimate (plain means in its rows) is reported with it
    old_rows = [{k: v for k, v in r.items() if k not in ("estimate", "latest_facts", "unweighted")} | (
        {"ES": r["unweighted"]["ES"]} if r["kind"] == "retention" and "unweighted" in r else {}) for r in rows]
    (path / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    assert [r.get("ES") for r in run_rows(path)] == pytest.approx([r.get("ES") for r in rows])
    assert current_summary(path)["retained"]["ES"] == pytest.approx(retention[-1]["ES"])
    summary = json.loads((path / "summary.json").read_text())
    assert summary["known"]["first"]["accuracy"] == 1.0 and summary["retention"]["sample_size"] == 2

    # --retention_all_at_end: the last evaluation scores every edited fact
    everything = run(dataclasses.replace(options, retention_all_at_end=True), fresh(tokenizer), tiny_hparams())
    last = [r for r in read_jsonl(everything / "probes.jsonl") if r["kind"] == "retention"][-1]
    assert (last["n_cases"], last["scope"]) == (5, "all")


def test_continued_run_scores_the_same_sample(tmp_path, tokenizer):
    options = dataclasses.replace(run_options(tmp_path), retention_sample=2)
    whole = run(options, fresh(tokenizer), tiny_hparams())
    first = run(dataclasses.replace(options, stop_after=3), fresh(tokenizer), tiny_hparams())
    run(dataclasses.replace(options, continue_from_run=first.name), fresh(tokenizer))

    def retention_lines(path):
        return [(c["n_edits"], c["case_id"], c["metrics"]) for c in read_jsonl(path / "cases.jsonl") if c["phase"] == "retention"]
    assert retention_lines(first) == retention_lines(whole)
    assert json.loads((first / "config.json").read_text())["retention"] == json.loads((whole / "config.json").read_text())["retention"]


def test_runs_stored_before_the_sample_continue_scoring_every_fact():
    from experiments.pipeline.run_config import RunOptions

    stored = {k: v for k, v in RunOptions().to_dict().items() if k not in ("retention_sample", "known_facts")}
    options = RunOptions.from_dict(stored)
    assert options.retention_sample == 0 and options.known_facts == 0


def test_stop_on_perplexity_ends_the_run_collapsed(tmp_path, tokenizer, monkeypatch):
    """A model whose perplexity reaches RATIO x the pre-edit one at an evaluation: the run ends
    there, status collapsed, and the summary names the rule and where it was met."""
    from experiments.pipeline.evals import EvalSuite

    def rising(self, n_edits):  # perplexity 10, 20, 30, ... at 0, 1, 2, ... edits
        return {"kind": "perplexity", "protocol": "kedit", "n_edits": n_edits, "perplexity": 10.0 * (1 + n_edits), "seconds": 0.0}
    monkeypatch.setattr(EvalSuite, "perplexity_row", rising)
    options = dataclasses.replace(run_options(tmp_path), stop_on_perplexity=4.0, downstream_eval_steps=2)
    path = run(options, fresh(tokenizer), tiny_hparams())
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "collapsed" and summary["n_edits"] == 4  # 50 >= 4 x 10 at the evaluation after 4
    assert summary["collapse"] == {"rule": "perplexity >= 4 x pre-edit", "n_edits": 4}
    assert "Collapse (perplexity >= 4 x pre-edit): at the evaluation after 4 edits" in (path / "summary.md").read_text()


FLAT_RECORDS = [
    {"case_id": 10 + i, "prompt": f"{s} is located in", "subject": s, "target_new": new, "ground_truth": true,
     "rephrase_prompt": f"Where is {s}? It is in", "locality_prompt": f"{other} is located in", "locality_ground_truth": true}
    for i, (s, new, true, other) in enumerate([("Kyoto", "Italy", "Japan", "Osaka"), ("Lyon", "Peru", "France", "Nice"),
                                               ("Porto", "Chile", "Portugal", "Braga"), ("Cork", "Mali", "Ireland", "Sligo")])
]


@pytest.mark.parametrize("protocol,sequential", [("kedit", True), ("alphaedit", False)])
def test_flat_counterfact_runs_under_both_protocols(tmp_path, tokenizer, protocol, sequential):
    """The flattened CounterFact layout: efficacy, paraphrase and locality (neighbourhood) scored,
    generation from the records' own prompts, and the config and summary say what was measured."""
    options = run_options(tmp_path)
    flat = tmp_path / "data" / "counterfact" / "flat"
    flat.mkdir(parents=True)
    (flat / "counterfact-train.json").write_text(json.dumps(FLAT_RECORDS))
    options = dataclasses.replace(options, ds_name="flat_cf_train", custom_path=None, dataset_size_limit=4, protocol=protocol,
                                  sequential=sequential, num_edits=1 if sequential else 2)
    path = run(options, fresh(tokenizer), tiny_hparams())
    summary = json.loads((path / "summary.json").read_text())
    assert summary["dataset"]["name"] == "flat_cf_train" and "locality" in summary["dataset"]["measures"]
    assert summary["n_edits"] == 4 and summary["current"]["n_cases"] == 4
    for key in ("ES", "PS", "NS"):
        assert summary["current"][key] is not None and summary["retained"][key] is not None
    generation = [r for r in read_jsonl(path / "probes.jsonl") if r["kind"] == "generation"][-1]
    assert generation["fluency"] > 0 and generation["consistency"] is None  # no attribute prompts in the flat layout
    assert "Dataset `flat_cf_train`" in (path / "summary.md").read_text()


def test_cf_flat_runs_generate_from_the_original_records_only(tmp_path, tokenizer):
    """cf_flat (study d): original-schema records, then flat records of other facts; both files are
    hashed into the config, and every generation row (before, during, the final one over all facts)
    generates from the original records' generation prompts, never from a flat record's own."""
    options = run_options(tmp_path)
    folder = tmp_path / "data" / "counterfact"
    (folder / "flat").mkdir(parents=True)
    (folder / "flat" / "counterfact-train.json").write_text(json.dumps(FLAT_RECORDS))
    original = [{"case_id": case_id, "requested_rewrite": {"prompt": "{} is located in", "subject": subject,
                 "target_new": {"str": "Spain"}, "target_true": {"str": true}},
                 "paraphrase_prompts": [f"{subject} lies in", f"The city of {subject} is in"],
                 "neighborhood_prompts": [f"{other} is located in"], "attribute_prompts": ["Madrid is located in"],
                 "generation_prompts": [f"{subject} is a city", f"In {subject}, people"]}
                for case_id, subject, true, other in ((11, "Lyon", "France", "Nice"), (3, "Bern", "Switzerland", "Basel"))]
    (folder / "counterfact.json").write_text(json.dumps(original))
    options = dataclasses.replace(options, ds_name="cf_flat", custom_path=None, dataset_size_limit=4, protocol="alphaedit",
                                  sequential=True, num_edits=2)
    path = run(options, fresh(tokenizer), tiny_hparams())
    config = json.loads((path / "config.json").read_text())
    assert {"cases", "cases:flat_cf_train"} <= set(config["data"])
    edited = [e["case_ids"] for e in read_jsonl(path / "edits.jsonl")]
    assert edited == [[11, 3], [10, 12]]  # flat case 11 (Lyon) is the original record's fact: passed over
    generation = [r for r in read_jsonl(path / "probes.jsonl") if r["kind"] == "generation"]
    assert len(generation) >= 3 and generation[-1]["scope"] == "all"
    assert all(sample["case_id"] in (11, 3) for row in generation for sample in row["samples"])
    assert generation[-1]["consistency"] is not None
    summary = json.loads((path / "summary.json").read_text())
    assert summary["dataset"]["name"] == "cf_flat" and "original-schema records' generation" in summary["dataset"]["measures"]
