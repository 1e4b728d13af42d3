"""Evaluation protocols: each pinned on hand-made fixtures with numbers computed by hand, the
AlphaEdit probe and generation settings against independent model calls, and a whole run whose
every number names its protocol."""
from __future__ import annotations

import csv
import dataclasses
import io
import json

import pytest
import torch

from data.probes import PROBE_TASKS, ProbeExample, ProbeSet
from experiments.evaluate import options_from_argv
from experiments.metrics.counterfact import CaseResult, PromptScore, summarize
from experiments.metrics.formulas import weighted_f1
from experiments.metrics.generation import alphaedit_text, generate
from experiments.metrics.probes import ALPHAEDIT_FORMATS, evaluate_probe_generated, probe_result
from experiments.metrics.protocols import PROTOCOLS, paper_columns
from experiments.pipeline.run import run
from experiments.reporting.plots import write_paper_columns
from experiments.reporting.summary import paper_curve, table_row
from experiments.summarize import csv_text
from tests.helpers import tiny_hparams
from tests.test_evaluate_run import fresh, options  # noqa: F401 (fixtures)
from util.errors import RunError
from util.files import read_jsonl
from util.sampling import seeded_sample



def score(nll_new, nll_true, argmax=False, token_acc=None) -> PromptScore:
    return PromptScore("p", nll_new, nll_true, argmax, token_acc)


# CounterFact-like: per case ES 1 / 0, PS 1/2 / 1/2, NS 1/2 / 1 -> ES 0.5, PS 0.5, NS 0.75.
COUNTERFACT = [
    CaseResult(1, (score(0.5, 1.0),), (score(2.0, 1.0), score(0.1, 0.2)), (score(1.0, 0.5), score(0.5, 1.0))),
    CaseResult(2, (score(1.0, 0.1),), (score(0.1, 1.0), score(0.3, 0.2)), (score(3.0, 0.2), score(2.0, 0.1))),
]
# zsRE-like (no true target): every-token argmax vs the fraction of tokens that are the argmax.
ZSRE = [
    CaseResult(3, (score(0.3, None, False, 0.5),), (score(0.2, None, True, 1.0),), (score(None, 0.4, False, 0.25),)),
    CaseResult(4, (score(0.1, None, True, 1.0),), (score(0.9, None, False, 0.0),), (score(None, 0.6, False, 0.75),)),
]
GENERATION = {"fluency": 6.2, "consistency": 0.3}


@pytest.mark.parametrize("records, kedit, alphaedit", [
    (COUNTERFACT, (0.5, 0.5, 0.75, 6.2, 0.3), (50.0, 50.0, 75.0, 620.0, 30.0)),
    # kedit: rewrite all-token acc (0 + 1)/2, paraphrase (1 + 0)/2, neighbourhood (0 + 0)/2;
    # alphaedit: per-token (0.5 + 1)/2, (1 + 0)/2, (0.25 + 0.75)/2, x100.
    (ZSRE, (0.5, 0.5, 0.0, 6.2, 0.3), (75.0, 50.0, 50.0, 620.0, 30.0)),
], ids=["counterfact", "zsre"])
def test_paper_columns_by_hand_under_each_protocol(records, kedit, alphaedit):
    retained = summarize(records)
    for name, expected in (("kedit", kedit), ("alphaedit", alphaedit)):
        columns = paper_columns(name, retained, GENERATION)
        assert list(columns.values()) == pytest.approx(list(expected)), name


def test_probe_answers_and_scores_by_hand():
    read = {task: form.read for task, form in ALPHAEDIT_FORMATS.items()}
    assert read["sst2"]("Review :a fine film\nSentiment : Positive, really") == 1
    assert read["sst2"]("Review :a fine film\nSentiment : meh") == -1  # no keyword: no answer
    assert read["mrpc"]("...\nAnswer: No.") == 0 and read["cola"]("...\nAnswer:  yes") == 1
    assert read["rte"]("p\nquestion: h True or False?\nanswer: True") == 1  # AlphaEdit's reading, kept
    assert read["nli"]("p entails the h True or False? Answer: false") == 1  # 1 = not_entailment here
    assert read["mmlu"]("Question: q\n(A) x\n(B) y\n(C) z\n(D) w\nAnswer: B\nQuestion") == 1
    # gold 0 0 1 1, predicted 0 -1 1 0: class 0 F1 = 2/(2+1+1) = 1/2, class 1 F1 = 2/(2+0+1) = 2/3,
    # weighted by gold counts 2 and 2: 7/12; accuracy 2/4; one unreadable answer.
    task = ProbeSet(PROBE_TASKS["sst2"], (), tuple(ProbeExample(("s",), label) for label in (0, 0, 1, 1)), "hand")
    result = probe_result(task, [0, -1, 1, 0], 0, 0, ())
    assert result.weighted_f1 == pytest.approx(7 / 12) and weighted_f1([0, -1, 1, 0], [0, 0, 1, 1]) == pytest.approx(7 / 12)
    assert result.accuracy == 0.5 and result.invalid == 1
    summary = {"probes": {"sst2": {"first": result.to_dict(), "last": result.to_dict()}}, "current": {}, "retained": {},
               "perplexity": None, "n_disabling": 0, "status": "complete", "run": "r", "alg_name": "A", "model": "m",
               "mode": "sequential", "batch_size": 1, "n_edits": 4}
    assert table_row({**summary, "protocol": "kedit"}, ["sst2"])["sst2 acc"] == "0.500 → 0.500"
    assert table_row({**summary, "protocol": "alphaedit"}, ["sst2"])["sst2 f1"] == "0.583 → 0.583"


def test_generated_probe_equals_independent_greedy_generation(tiny_llama):
    examples = tuple(ProbeExample((f"the {w} sat", "a cat sat"), i % 2) for i, w in enumerate(["cat", "dog", "big old bird"]))
    task = ProbeSet(PROBE_TASKS["mrpc"], (), examples, "hand")
    result = evaluate_probe_generated(tiny_llama, task, new_tokens=5)
    form = ALPHAEDIT_FORMATS["mrpc"]
    for example, predicted in zip(task.test, result.predictions):
        prompt = form.template.format(*example.texts)
        ids = torch.tensor([tiny_llama.tok(prompt)["input_ids"]])
        out = tiny_llama.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                        pad_token_id=tiny_llama.tok.pad_token_id)
        assert predicted == form.read(prompt + tiny_llama.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def test_total_length_generation_and_text_cleaning(tiny_llama):
    prompts = ["The river", "A long prompt about the history of the old city and"]
    together = generate(tiny_llama, prompts, top_k=None, total_length=16)
    for prompt, text in zip(prompts, together):
        alone = generate(tiny_llama, [prompt], max_new_tokens=16 - len(tiny_llama.tok(prompt)["input_ids"]), top_k=None)
        assert text == alone[0]
    assert alphaedit_text("Caf\u00e9\n\nnext\nline") == "Cafe\u0301 next\nline"


def test_protocol_defaults_apply_to_flags_not_given():
    options = options_from_argv(["--protocol", "alphaedit"])
    assert (options.number_of_few_shots, options.number_of_tests) == (0, 100)
    assert options.downstream_tasks == ("sst2", "mrpc", "cola", "rte", "mmlu", "nli")
    options = options_from_argv(["--protocol", "alphaedit", "--number_of_tests", "7", "--downstream_tasks", "sst2"])
    assert (options.number_of_few_shots, options.number_of_tests, options.downstream_tasks) == (0, 7, ("sst2",))
    assert options_from_argv([]).number_of_few_shots == 3 and set(PROTOCOLS) == {"kedit", "alphaedit"}
    with pytest.raises(RunError, match="--protocol 'nope': choose from kedit, alphaedit"):
        options_from_argv(["--protocol", "nope"])


def test_every_number_of_an_alphaedit_run_names_its_protocol(options, tokenizer, tmp_path):
    options = dataclasses.replace(options, protocol="alphaedit", number_of_few_shots=0, generation_test_interval=4)
    sst2 = tmp_path / "data" / "glue" / "sst2.jsonl"
    labels = [i % 2 for i in range(10)] + [1, 1, 0, 1, 0, 0]  # test items: the first 4 differ from a seeded 4
    sst2.write_text("".join(json.dumps({"sentence": f"a film number {i}", "label": label}) + "\n" for i, label in enumerate(labels)))
    path = run(options, fresh(tokenizer), tiny_hparams())
    rows = [json.loads(line) for line in (path / "probes.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"probe", "perplexity", "retention", "generation"}
    assert all(r["protocol"] == "alphaedit" for r in rows)
    probe = next(r for r in rows if r["kind"] == "probe")  # the first 4 test items in file order (items 10-13)
    assert probe["gold"] == [1, 1, 0, 1] and probe["n_shots"] == 0
    final = [r for r in rows if r["kind"] == "generation"][-1]
    assert final["n_edits"] == 5 and final["scope"] == "all" and len(final["samples"]) == 5  # every edited fact
    summary = json.loads((path / "summary.json").read_text())
    assert summary["protocol"] == "alphaedit"
    for block in ("current", "retained", "perplexity", "generation", "paper"):
        assert summary[block]["protocol"] == "alphaedit", block
    assert summary["probes"]["sst2"]["protocol"] == "alphaedit"
    assert summary["paper"]["Fluency"] == pytest.approx(100 * final["fluency"])
    assert summary["paper"]["||W - W0||"] == summary["final_drift_norm"] > 0
    text = (path / "summary.md").read_text()
    assert "Protocol `alphaedit`" in text and "| Efficacy | Generalization | Specificity | Fluency | Consistency |" in text
    assert "- probes: zero-shot in AlphaEdit's wording" in text
    row = next(csv.DictReader(io.StringIO(csv_text([summary]))))
    assert row["protocol"] == "alphaedit" and float(row["Fluency"]) == pytest.approx(summary["paper"]["Fluency"])
    curve = paper_curve(path)
    assert [c["edits"] for c in curve] == [0, 2, 4, 5] and curve[-1]["Efficacy"] == pytest.approx(summary["paper"]["Efficacy"])
    assert write_paper_columns({"R-ROME": path}, tmp_path / "columns.png", "t").read_bytes()[:4] == b"\x89PNG"
    # --final_generation_sample: the last generation over a seeded sample of the edited facts, said so
    sampled = run(dataclasses.replace(options, final_generation_sample=2), fresh(tokenizer), tiny_hparams())
    last = [r for r in read_jsonl(sampled / "probes.jsonl") if r["kind"] == "generation"][-1]
    every = [s["case_id"] for s in final["samples"]]
    assert (last["scope"], last["facts"]) == ("sample", 2)
    assert [s["case_id"] for s in last["samples"]] == seeded_sample(every, 2, options.seed)
    assert json.loads((sampled / "summary.json").read_text())["generation"]["last"]["facts"] == 2
