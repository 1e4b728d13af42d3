"""evaluate.py without a model: flags, one-line errors, continued options, disabling-edit rules,
run-folder files, summaries and the table over runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from data.records import CaseRecord
from experiments.evaluate import main, options_from_argv
from experiments.pipeline.checkpoint import Checkpoint, RunFolder
from experiments.pipeline.evals import prompt_budget
from experiments.pipeline.health import UpdateHealth, disabling_reasons
from experiments.pipeline.run_config import HealthThresholds, RunOptions
from experiments.reporting.plots import batch_size_lines, batch_size_points, write_batch_sizes
from experiments.reporting.summary import (below_half, build_summary, curve_markdown, curve_rows, milestones, milestones_markdown,
                                          summary_markdown, write_summary)
from experiments.summarize import main as summarize_main
from util.cli import run_cli
from util.deltas import apply_deltas, digest, restore, snapshot
from util.environment import Environment
from util.errors import RunError
from util.files import JsonlStream, read_jsonl
from util.paths import Caches
from util.requests import make_request


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_booleans_are_flags_and_modes():
    assert options_from_argv([]).mode == "batched" and not options_from_argv([]).stop_on_collapse
    options = options_from_argv(["--sequential", "--stop_on_collapse", "--downstream_tasks", "sst2,mmlu"])
    assert options.sequential and options.stop_on_collapse and options.mode == "sequential"
    assert options.downstream_tasks == ("sst2", "mmlu")
    assert options_from_argv(["--sequential", "--num_edits", "4"]).mode == "sequential-batched"
    assert options_from_argv(["--downstream_tasks", "none"]).downstream_tasks == ()
    assert options_from_argv(["--skip_generation_tests"]).generation_test_interval == 0
    assert options_from_argv(["--value_dtype", "bfloat16", "--value_compile"]).value_compile
    assert options_from_argv(["--value_compile"]).value_compile  # float32 values too (compiled Llama layer function)
    assert options_from_argv(["--set", "v_lr=0.1", "--set", "layers=[3]"]).overrides == ("v_lr=0.1", "layers=[3]")
    assert options_from_argv(["--model_name", "EleutherAI/gpt-j-6B"]).hparams_file == "EleutherAI_gpt-j-6B.yaml"
    with pytest.raises(RunError, match="ignored explicit argument"):
        options_from_argv(["--sequential=false"])


@pytest.mark.parametrize("argv, message", [
    (["--alg_name", "FOO"], "unknown algorithm 'FOO'"),
    (["--num_edits", "x"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
    (["--ds_name", "custom"], "--custom_path"),
    (["--ds_name", "nope"], "unknown dataset 'nope'"),
    (["--downstream_tasks", "sst2,glue"], "unknown task(s) glue"),
    (["--number_of_few_shots", "11"], "few-shot pool"),
    (["--num_edits", "0"], "--num_edits must be at least 1"),
    (["--hparams_fname", "missing.yaml"], "does not exist"),
])
def test_bad_flags_fail_in_one_line(capsys, argv, message):
    assert message in one_line_error(capsys, argv)


def test_bad_hparams_file_fails_in_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [4]\nbogus_key: 1\n")
    assert "unknown key 'bogus_key'" in one_line_error(capsys, ["--alg_name", "MEMIT", "--hparams_fname", str(bad)])


def test_continued_run_keeps_stored_options_and_takes_session_flags(tmp_path):
    stored = RunOptions(dataset_size_limit=7, num_edits=2, sequential=True, seed=3, results_dir=str(tmp_path))
    folder = RunFolder.create(tmp_path, "R-ROME")
    (folder.path / "config.json").write_text(json.dumps({"options": stored.to_dict()}))
    options = options_from_argv(["--continue_from_run", "run_001", "--results_dir", str(tmp_path), "--device", "cuda", "--stop_after", "2"])
    assert (options.dataset_size_limit, options.num_edits, options.seed, options.mode) == (7, 2, 3, "sequential-batched")
    assert (options.device, options.stop_after, options.continue_from_run) == ("cuda", 2, "run_001")
    assert options.differences(stored) == []
    changed = options_from_argv(["--continue_from_run", "run_001", "--results_dir", str(tmp_path), "--num_edits", "4"])
    assert changed.differences(stored) == ["num_edits"]
    # the last evaluation's sample may be set anew before the run ends (it defines nothing measured so far)
    final = options_from_argv(["--continue_from_run", "run_001", "--results_dir", str(tmp_path), "--final_generation_sample", "3"])
    assert final.final_generation_sample == 3 and final.differences(stored) == []
    with pytest.raises(RunError, match="run_009"):
        options_from_argv(["--continue_from_run", "run_009", "--results_dir", str(tmp_path)])


def test_environment_is_read_once_into_the_options(tmp_path):
    """$KEDIT_CORPUS is a new run's corpus unless --corpus is given; a continued run keeps the
    corpus it ran with (recorded only under "corpus" by runs from before the options held it)."""
    env = Environment.read({"KEDIT_CORPUS": "wiki", "KEDIT_DATA_DIR": "/data", "HF_DATASETS_OFFLINE": "1", "KEDIT_GIT_SHA": ""})
    assert (env.corpus, env.data_dir, env.download_dir, env.offline, env.git_sha) == ("wiki", "/data", None, True, None)
    assert Environment.read({}) == Environment()
    options = options_from_argv([], env)
    assert options.corpus == os.path.abspath("wiki") and options.environment == env
    assert options_from_argv(["--corpus", "mine"], env).corpus == os.path.abspath("mine")
    assert options_from_argv([], Environment()).corpus is None
    stored = RunOptions(results_dir=str(tmp_path))
    folder = RunFolder.create(tmp_path, "R-ROME")
    (folder.path / "config.json").write_text(json.dumps({"options": stored.to_dict(), "corpus": {"path": "/old/corpus"}}))
    again = options_from_argv(["--continue_from_run", "run_001", "--results_dir", str(tmp_path)], env)
    assert again.corpus == "/old/corpus" and again.environment == env


def test_cache_folders_are_read_with_the_environment_and_travel_in_the_options(tmp_path):
    """KEDIT_CACHE moves every cache, KEDIT_MODEL_CACHE the dequantised models alone; unset, they
    are ~/.cache/kedit and its models/. A run's options carry them (through config.json too)."""
    home = Path.home() / ".cache" / "kedit"
    assert Environment.read({}).caches == Environment().caches == Caches(home, home / "models")
    moved = Environment.read({"KEDIT_CACHE": str(tmp_path / "c")}).caches
    assert moved == Caches(tmp_path / "c", tmp_path / "c" / "models") and moved.stats == tmp_path / "c" / "stats"
    apart = Environment.read({"KEDIT_CACHE": str(tmp_path / "c"), "KEDIT_MODEL_CACHE": str(tmp_path / "m")}).caches
    assert apart == Caches(tmp_path / "c", tmp_path / "m")
    options = options_from_argv([], Environment.read({"KEDIT_CACHE": str(tmp_path / "c")}))
    assert RunOptions.from_dict(json.loads(json.dumps(options.to_dict()))).environment.caches == moved


def test_health_reads_norms_of_what_the_caller_keeps():
    """The health monitor keeps no weights: W0 comes from the session, which also restores it."""
    model = torch.nn.Linear(3, 2, bias=False).double()
    weights0 = snapshot(model, ["weight"])
    health = UpdateHealth(["weight"], HealthThresholds())
    delta = {"weight": torch.ones(2, 3, dtype=torch.float64)}
    apply_deltas(model, delta)
    row = health.measure(model, delta, weights0)
    assert row["delta_norm"] == pytest.approx(6 ** 0.5) and row["drift_norm"] == pytest.approx(6 ** 0.5)
    assert row["matrices"][0]["weight0_norm"] == pytest.approx(weights0["weight"].norm().item())
    assert digest(snapshot(model, ["weight"])) != digest(weights0)
    restore(model, weights0)
    assert health.measure(model, {}, weights0)["drift_norm"] == 0.0 and digest(snapshot(model, ["weight"])) == digest(weights0)
    assert not [name for name, value in vars(health).items() if isinstance(value, (torch.Tensor, dict))]


def test_disabling_reasons_on_hand_made_records():
    t = HealthThresholds(entropy_ratio=0.5, norm_jump=10.0, min_history=3)
    assert disabling_reasons(100.0, [1.0, 2.0], None, None, t) == []  # too little history to judge a jump
    assert disabling_reasons(19.9, [1.0, 2.0, 3.0], None, None, t) == []  # median 2: the cut is 20
    (reason,) = disabling_reasons(20.1, [1.0, 2.0, 3.0], None, None, t)
    assert reason.startswith("norm jump")
    assert disabling_reasons(1.0, [1.0] * 5, 2.6, 5.0, t) == []
    (reason,) = disabling_reasons(1.0, [1.0] * 5, 2.4, 5.0, t)
    assert reason.startswith("entropy collapse")
    assert len(disabling_reasons(50.0, [1.0] * 5, 0.1, 5.0, t)) == 2
    assert disabling_reasons(1.0, [], 0.0, None, t) == []  # no pre-edit fluency: no entropy rule


def test_jsonl_stream_truncates_and_reader_skips_a_cut_line(tmp_path):
    stream = JsonlStream(tmp_path / "s.jsonl")
    stream.write({"a": 1, "b": float("nan"), "c": (1, 2)})
    size = stream.size()
    stream.write({"a": 2})
    stream.truncate(size)
    stream.write({"a": 3})
    stream.close()
    assert read_jsonl(tmp_path / "s.jsonl") == [{"a": 1, "b": None, "c": [1, 2]}, {"a": 3}]
    with (tmp_path / "s.jsonl").open("a") as handle:
        handle.write('{"a": 4, "b"')  # a crash in the middle of a line
    assert [r["a"] for r in read_jsonl(tmp_path / "s.jsonl")] == [1, 3]


def test_run_folders_are_numbered_and_checkpoints_replace_each_other(tmp_path):
    first, second = RunFolder.create(tmp_path, "MEMIT"), RunFolder.create(tmp_path, "MEMIT")
    assert (first.path.name, second.path.name) == ("run_001", "run_002")
    first.open_streams()
    for n in (2, 4):
        weights = {"w": torch.full((2, 3), float(n))}
        first.save_checkpoint(Checkpoint(n, n, first.sizes(), weights, {"k/x": torch.ones(2)}, {"status": "running"}))
    ckpt = first.load_checkpoint(first.verify())
    assert ckpt.n_edits == 4 and torch.equal(ckpt.weights["w"], torch.full((2, 3), 4.0))
    assert torch.equal(ckpt.context["k/x"], torch.ones(2))
    names = sorted(p.name for p in first.checkpoints.iterdir())
    assert len(names) == 3 and names[1] == "state.json", names
    assert names[0].startswith("context_000004_000004_") and names[2].startswith("weights_000004_000004_")
    first.close()


def case_line(case_id, n_edits, new_wins: bool) -> dict:
    score = {"prompt": "p", "nll_new": 1.0 if new_wins else 2.0, "nll_true": 2.0 if new_wins else 1.0, "argmax": new_wins}
    neighbour = {"prompt": "q", "nll_new": 3.0, "nll_true": 1.0, "argmax": True}
    return {"phase": "current", "n_edits": n_edits, "batch": n_edits - 1, "case_id": case_id,
            "rewrite": [score], "paraphrase": [score], "neighborhood": [neighbour]}


def edit_line(n_edits, delta, reasons=()):
    return {"batch": n_edits - 1, "n_edits": n_edits, "case_ids": [n_edits], "disabling": list(reasons),
            "current": {"ES": 1.0}, "health": {"delta_norm": delta, "drift_norm": delta * n_edits, "matrices": []},
            "seconds": {"edit": 2.0, "evaluate": 1.0}}


def probe(n_edits, acc):
    return {"kind": "probe", "task": "sst2", "n_edits": n_edits, "accuracy": acc, "macro_f1": acc, "mcc": 0.0, "seconds": 1.0}


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def hand_made_run(tmp_path):
    path = tmp_path / "results" / "ROME" / "run_001"
    path.mkdir(parents=True)
    config = {"alg_name": "ROME", "model": "m", "mode": "sequential", "batch_size": 1, "seed": 0,
              "git_commit": "abc", "n_cases": 3, "hparams": {"layers": [4]}}
    (path / "config.json").write_text(json.dumps(config))
    write_lines(path / "edits.jsonl", [edit_line(1, 1.0), edit_line(2, 1.5), edit_line(3, 40.0, ["norm jump: big"])])
    write_lines(path / "cases.jsonl", [case_line(1, 1, True), case_line(2, 2, True), case_line(3, 3, False)])
    write_lines(path / "probes.jsonl", [
        probe(0, 0.8), {"kind": "perplexity", "n_edits": 0, "perplexity": 20.0, "seconds": 1.0},
        {"kind": "known", "n_edits": 0, "accuracy": 1.0, "nll": 0.5, "n_items": 40, "chance": 2e-5, "seconds": 0.0},
        {"kind": "retention", "n_edits": 3, "ES": 0.5, "PS": 0.5, "NS": 1.0, "S": 0.6, "n_cases": 2, "scope": "sample",
         "facts_in_model": 3, "seconds": 1.0},
        {"kind": "known", "n_edits": 3, "accuracy": 0.75, "nll": 0.9, "n_items": 40, "chance": 2e-5, "seconds": 0.0},
        probe(3, 0.6), {"kind": "perplexity", "n_edits": 3, "perplexity": 90.0, "seconds": 1.0},
    ])
    return path


def test_summary_from_hand_made_files(hand_made_run):
    summary = build_summary(hand_made_run, "complete")
    assert summary["n_edits"] == 3 and summary["n_disabling"] == 1
    assert summary["disabling"] == [{"batch": 2, "n_edits": 3, "case_ids": [3], "reasons": ["norm jump: big"]}]
    current = summary["current"]
    assert current["ES"] == pytest.approx(2 / 3) and current["NS"] == 1.0
    assert current["S"] == pytest.approx(3 / (1.5 + 1.5 + 1.0))
    assert summary["retained"]["S"] == 0.6 and summary["retained"]["n_edits"] == 3
    assert summary["probes"]["sst2"]["first"]["accuracy"] == 0.8 and summary["probes"]["sst2"]["last"]["accuracy"] == 0.6
    assert summary["perplexity"]["last"]["perplexity"] == 90.0 and summary["max_delta_norm"] == 40.0
    assert summary["seconds"] == {"edit": 6.0, "evaluate": 3.0, "periodic": 5.0}
    assert summary["known"]["first"]["accuracy"] == 1.0 and summary["known"]["last"]["accuracy"] == 0.75
    text = summary_markdown(summary)
    assert "0.800 → 0.600" in text and "20.00 → 90.00" in text and "norm jump: big" in text
    assert "Known facts" in text and "1.000 → 0.750 of 40 still completed" in text


def test_course_of_a_run_from_hand_made_files(hand_made_run):
    before, after = curve_rows(hand_made_run)
    assert before == {"edits": 0, "ES": None, "PS": None, "NS": None, "S": None, "scored": None, "known": 1.0, "ppl": 20.0,
                      "probe acc": 0.8, "||W - W0||": 0.0, "disabling": 0, "edit min": 0.0}
    assert after["edits"] == 3 and after["S"] == 0.6 and after["ppl"] == 90.0 and after["probe acc"] == 0.6
    assert after["scored"] == 2 and after["known"] == 0.75
    assert after["||W - W0||"] == 120.0 and after["disabling"] == 1 and after["edit min"] == pytest.approx(0.1)
    table = curve_markdown({"ROME": hand_made_run})
    assert "| ROME | 3 | 0.500 | 0.500 | 1.000 | 0.600 | 2 | 0.750 | 90.00 | 0.600 | 120.0 | 1 | 0.1 |" in table


def test_milestones_of_a_run(hand_made_run):
    write_summary(hand_made_run, "complete")
    marks = milestones(hand_made_run)
    assert marks["first disabling"] == 3 and marks["collapse"] is None  # perplexity 20 -> 90 is 4.5x, not 10x
    assert marks["collapse rule"] == "perplexity >= 10 x pre-edit" and marks["S below half"] is None
    assert marks["evaluation share"] == pytest.approx(8 / 14) and marks["edits/hour"] == pytest.approx(3600 * 3 / 14)
    assert "| ROME | 3 | complete | 3 | - | - | - | 0.57 | 771 |" in milestones_markdown({"ROME": hand_made_run})


def test_batch_study_report_lists_batch_sizes_in_ascending_order(hand_made_run, tmp_path):
    """The batch study starts its largest batches first (their values serve the smaller ones); its
    report still reads from the smallest batch up."""
    import shutil

    from experiments import reproduce

    write_summary(hand_made_run, "complete")
    results = tmp_path / "study"
    for label in ("EMMET_batched_4096", "EMMET_batched_16", "MEMIT_seq-batched_16"):
        shutil.copytree(hand_made_run, results / "reproduce" / "batch" / label / "ROME" / "run_001")
    args, _ = reproduce.parse_args(["--study", "batch", "--report_only", "--results_dir", str(results), "--docs_dir", str(tmp_path / "docs")])
    reproduce.report("batch", args)
    text = (tmp_path / "docs" / "results_batch.md").read_text()
    course = text.split("Course of each run")[1]
    assert course.index("| EMMET_batched_16 |") < course.index("| EMMET_batched_4096 |") < course.index("| MEMIT_seq-batched_16 |")


def test_study_report_keeps_each_runs_record_and_redraws_from_it(hand_made_run, tmp_path, capsys):
    """A report copies what it read from each run folder into <docs>/runs/<study>/<label>: with the
    run folders gone it redraws the same table, and a shorter new run does not replace a record
    that is further on."""
    import shutil

    from experiments import reproduce

    write_summary(hand_made_run, "paused")
    results, docs = tmp_path / "study", tmp_path / "docs"
    for label in ("MEMIT", "EMMET"):
        shutil.copytree(hand_made_run, results / "reproduce" / "lifelong" / label / "ROME" / "run_001")
    args, _ = reproduce.parse_args(["--study", "lifelong", "--report_only", "--results_dir", str(results), "--docs_dir", str(docs)])
    reproduce.report("lifelong", args)
    table = (docs / "results_lifelong.md").read_text()
    record = docs / "runs" / "lifelong" / "MEMIT"
    assert sorted(p.name for p in record.iterdir()) == sorted(reproduce.RECORD_FILES)  # no cases.jsonl, no checkpoint
    shutil.rmtree(results)
    (docs / "results_lifelong.md").unlink()
    reproduce.report("lifelong", args)
    assert (docs / "results_lifelong.md").read_text() == table
    assert "reported from its record" in capsys.readouterr().err
    restarted = results / "reproduce" / "lifelong" / "MEMIT" / "ROME" / "run_001"
    shutil.copytree(hand_made_run, restarted)
    summary = json.loads((restarted / "summary.json").read_text())
    (restarted / "summary.json").write_text(json.dumps({**summary, "n_edits": 1}))
    reproduce.report("lifelong", args)
    assert (docs / "results_lifelong.md").read_text() == table and json.loads((record / "summary.json").read_text())["n_edits"] == 3
    assert "further on than" in capsys.readouterr().err
    (restarted / "summary.json").write_text(json.dumps({**summary, "n_edits": 5}))
    reproduce.report("lifelong", args)
    assert json.loads((record / "summary.json").read_text())["n_edits"] == 5


def test_below_half_starts_from_the_unedited_model_where_it_was_measured():
    curve = [{"edits": 0, "S": None, "known": 1.0}, {"edits": 50, "S": 0.9, "known": 0.9}, {"edits": 100, "S": 0.5, "known": 0.49},
             {"edits": 150, "S": 0.44, "known": 0.4}]
    assert below_half(curve, "S") == 150  # retention has no pre-edit value: 0.44 < 0.45; 0.5 is not below half of 0.9
    assert below_half(curve, "known") == 100  # half of the unedited 1.0, not of 0.9 at the first point
    assert below_half(curve, "ppl") is None and below_half(curve[:3], "S") is None and below_half(curve[:1], "known") is None
    # evaluated only every 500 edits and already below half at the first point: 500, not "never"
    assert below_half([{"edits": 0, "S": None, "known": 1.0}, {"edits": 500, "S": 0.8, "known": 0.4}], "known") == 500


def test_batch_size_points_and_plot(tmp_path):
    batched = {"alg_name": "EMMET", "mode": "batched", "batch_size": 16, "current": {"ES": 0.9, "PS": 0.8, "NS": 0.7, "S": 0.8},
               "retained": {"ES": 0.1}, "known": {"last": {"accuracy": 0.95}}, "perplexity": {"last": {"perplexity": 31.0}}}
    seq = {**batched, "mode": "sequential-batched", "batch_size": 64, "retained": {"ES": 0.6, "PS": 0.5, "NS": 0.4, "S": 0.5},
           "known": None}
    assert batch_size_points(batched) == {"ES": 0.9, "PS": 0.8, "NS": 0.7, "S": 0.8, "known": 0.95, "perplexity": 31.0}
    assert batch_size_points(seq)["ES"] == 0.6 and batch_size_points(seq)["known"] is None
    # the batched run in one batch of all its edits ends the sequential-batched line (it is that run at its size)
    whole = {**batched, "batch_size": 4096, "n_edits": 4096, "current": {"ES": 0.3, "PS": 0.3, "NS": 0.3, "S": 0.3}}
    batched, seq = {**batched, "n_edits": 4096}, {**seq, "n_edits": 4096}
    lines = batch_size_lines([whole, seq, batched])
    assert [size for size, _ in lines[("EMMET", "batched")]] == [16, 4096]
    assert [(size, points["ES"]) for size, points in lines[("EMMET", "sequential-batched")]] == [(64, 0.6), (4096, 0.3)]
    assert list(batch_size_lines([whole, batched])) == [("EMMET", "batched")]  # no sequential-batched line drawn from it alone
    assert [size for size, _ in batch_size_lines([{**batched, "batch_size": 1024}, seq])[("EMMET", "sequential-batched")]] == [64]
    out = write_batch_sizes([whole, batched, seq], tmp_path / "b.png", "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarize_table_and_csv(hand_made_run, tmp_path, capsys):
    write_summary(hand_made_run, "complete")
    csv_path, md_path = tmp_path / "t.csv", tmp_path / "t.md"
    assert summarize_main([str(tmp_path / "results"), "--csv", str(csv_path), "--markdown", str(md_path)]) == 0
    out = capsys.readouterr().out
    header, rule, row = out.strip().split("\n")
    assert "ES cur" in header and "sst2 acc" in header and "| ROME | m | sequential | 1 | 3 |" in row
    assert md_path.read_text() == out
    lines = csv_path.read_text().strip().split("\n")
    assert lines[0].startswith("run,alg_name,model,mode,batch_size,n_edits,status,layers,seed,protocol,ES_current")
    assert "sst2_accuracy_first" in lines[0] and lines[1].startswith("run_001,ROME,m,sequential,1,3,complete,4,0,kedit,")


def test_generation_prompt_budget_takes_prompts_from_the_first_records():
    def request(i):
        return make_request({"prompt": "{} is in", "subject": f"S{i}", "target_new": "Rome", "case_id": i})

    own = [CaseRecord(request(i), paraphrase_prompts=(f"S{i} lies in",)) for i in range(3)]  # no generation prompts (flat, zsRE)
    assert [(r.case_id, r.generation_prompts) for r in prompt_budget(own, 3)] == [(0, ("S0 is in", "S0 lies in")), (1, ("S1 is in",))]
    assert [r.generation_prompts for r in prompt_budget(own[2:], None)] == [("S2 is in", "S2 lies in")]
    # cf_flat: where some records have generation prompts, only those generate, whatever the budget
    mixed = [CaseRecord(request(3), generation_prompts=("a", "b", "c")), own[1], CaseRecord(request(4), generation_prompts=("d",))]
    assert [(r.case_id, r.generation_prompts) for r in prompt_budget(mixed, 4)] == [(3, ("a", "b", "c")), (4, ("d",))]
    assert [(r.case_id, r.generation_prompts) for r in prompt_budget(mixed[1:], 1)] == [(4, ("d",))]
    assert [r.case_id for r in prompt_budget(mixed, None)] == [3, 4]


def test_offline_environment_keeps_the_statistics_corpus_off_the_network(monkeypatch, caches):
    """HF_*_OFFLINE, read once into the options, reaches the EditContext: Wikipedia is never tried."""
    from types import SimpleNamespace

    import util.corpus
    from rome.editor import EditContext

    asked = []
    monkeypatch.setattr(util.corpus, "online", lambda host="huggingface.co", timeout=2.0, offline=False: asked.append(offline) or not offline)
    monkeypatch.setattr(util.corpus, "wikipedia_stream", lambda: "wikipedia")
    monkeypatch.setattr(util.corpus, "sampled_corpus", lambda *a, **k: "sampled")
    lm = SimpleNamespace(model=None, tok=None, name="tiny")
    hparams = SimpleNamespace(mom2_n_samples=1, mom2_sample_tokens=8)
    assert EditContext(caches, offline=True).corpus(lm, hparams) == "sampled"
    assert EditContext(caches).corpus(lm, hparams) == "wikipedia"
    assert asked == [True, False]
