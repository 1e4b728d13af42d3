import json
import sys

import pytest
import torch

from experiments import reproduce, sweep
from util.errors import KeditError
from util.stats import fast_bfloat16


def test_grid_is_the_product_and_commands_carry_each_point():
    args, extra = sweep.parse_args(["--name", "g", "--alg_name", "ROME,EMMET", "--layers", "3,2-6", "--num_edits", "1,16",
                                    "--seeds", "0,1", "--", "--dataset_size_limit", "4"])
    points = sweep.grid(args)
    assert len(points) == 2 * 2 * 2 * 2
    assert {p.label() for p in points} >= {"ROME_L3-3_B1_s0", "EMMET_L2-6_B16_s1"}
    emmet = next(p for p in points if p.label() == "EMMET_L2-6_B16_s1")
    command = emmet.command(sweep.Path("out"), extra)
    assert command[command.index("--set") + 1] == "layers=[2, 3, 4, 5, 6]"
    assert command[command.index("--num_edits") + 1] == "16" and command[-2:] == ["--dataset_size_limit", "4"]
    assert len({p.label() for p in points}) == len(points)  # one folder per point


@pytest.mark.parametrize("argv, fragment", [
    (["--name", "g", "--layers", "a-b"], "--layers entry 'a-b'"),
    (["--name", "g", "--num_edits", "1,x"], "--num_edits '1,x'"),
    (["--name", "g", "--jobs", "0"], "--jobs must be at least 1"),
])
def test_bad_grids_fail_in_one_line(argv, fragment):
    with pytest.raises(KeditError, match=fragment):
        sweep.grid(sweep.parse_args(argv)[0])


def test_local_runner_shares_cores_and_logs(tmp_path):
    probe = [sys.executable, "-c", "import os; print('threads', os.environ['OMP_NUM_THREADS']); raise SystemExit(3)"]
    codes = sweep.run_local([("a", probe), ("b", [sys.executable, "-c", "pass"])], tmp_path, jobs=2)
    assert codes == [3, 0]
    threads = max(1, (sweep.os.cpu_count() or 1) // 2)
    assert f"threads {threads}" in (tmp_path / "a" / "sweep.log").read_text()
    sweep.run_local([("a", probe)], tmp_path, jobs=1)  # a second part of the run: its log follows the first's
    log = (tmp_path / "a" / "sweep.log").read_text()
    first, second = log.split("=== ")[1:]
    assert f"\nthreads {threads}\n" in first and f"\nthreads {max(1, sweep.os.cpu_count() or 1)}\n" in second


def test_reproduce_studies_run_the_same_edits_with_the_same_probes():
    args, extra = reproduce.parse_args(["--study", "batch", "--data_dir", "D", "--", "--number_of_tests", "9"])
    commands = dict(reproduce.commands("batch", args, extra))
    sizes = (16, 64, 256, 1024, 4096)
    assert set(commands) == ({f"{a}_batched_{n}" for a in ("EMMET", "MEMIT") for n in sizes}
                             | {f"{a}_seq-batched_{n}" for a in ("EMMET", "MEMIT") for n in sizes[:-1]})
    # the largest batch first: its values (optimised in chunks of 64, the cheapest per request) serve the smaller ones
    assert list(commands)[:4] == ["EMMET_batched_4096", "MEMIT_batched_4096", "EMMET_batched_1024", "MEMIT_batched_1024"]
    assert list(commands)[8:10] == ["EMMET_batched_16", "MEMIT_batched_16"] and list(commands)[10] == "EMMET_seq-batched_16"
    one = commands["EMMET_batched_4096"]
    assert one[one.index("--num_edits") + 1] == "4096" and "--sequential" not in one
    assert "--sequential" in commands["MEMIT_seq-batched_1024"]
    for command in commands.values():  # the same 4,096 flat CounterFact edits, evaluated at the same counts
        assert command[command.index("--dataset_size_limit") + 1] == "4096" and command[command.index("--ds_name") + 1] == "flat_cf_train"
        assert command[command.index("--downstream_eval_steps") + 1] == "1024"
        assert command[command.index("--data_dir") + 1] == "D" and command[-2:] == ["--number_of_tests", "9"]
        assert "--value_cache" in command  # each fact's value optimised once per editor, shared by the batch sizes
    args, extra = reproduce.parse_args(["--study", "batch", "--algs", "EMMET", "--runs", "EMMET_batched_16,MEMIT_batched_16"])
    assert list(dict(reproduce.commands("batch", args, extra))) == ["EMMET_batched_16"]
    args, extra = reproduce.parse_args(["--study", "batch", "--runs", "EMMET_batched_17"])
    with pytest.raises(KeditError, match="--runs EMMET_batched_17: study batch has runs EMMET_batched_4096"):
        reproduce.commands("batch", args, extra)
    with pytest.raises(KeditError, match="--study"):
        reproduce.parse_args(["--study", "nope"])


def test_rome_study_runs_until_collapse_and_lifelong_in_batches_of_100():
    args, extra = reproduce.parse_args(["--study", "rome"])
    commands = dict(reproduce.commands("rome", args, extra))
    assert list(commands) == ["ROME", "R-ROME"]
    for command in commands.values():
        assert command[command.index("--stop_on_perplexity") + 1] == "10" and "--sequential" in command
        assert command[command.index("--dataset_size_limit") + 1] == "1000"
    args, extra = reproduce.parse_args(["--study", "lifelong"])
    commands = dict(reproduce.commands("lifelong", args, extra))
    assert list(commands) == list(reproduce.LIFELONG_EDITORS)
    for command in commands.values():
        assert command[command.index("--num_edits") + 1] == "100" and command[command.index("--dataset_size_limit") + 1] == "10000"


@pytest.mark.parametrize("alg", reproduce.ALPHAEDIT_EDITORS)
def test_alphaedit_study_is_the_papers_protocol(alg):
    from experiments.evaluate import options_from_argv
    from editors import ALGORITHMS

    args, extra = reproduce.parse_args(["--study", "alphaedit"])
    commands = dict(reproduce.commands("alphaedit", args, extra))
    assert list(commands) == list(reproduce.ALPHAEDIT_EDITORS)
    if alg not in ALGORITHMS:
        pytest.skip(f"{alg} is not registered in editors.py yet")
    options = options_from_argv(commands[alg][2:-2])  # the evaluate.py flags, without --results_dir
    assert (options.alg_name, options.protocol, options.mode, options.num_edits) == (alg, "alphaedit", "sequential-batched", 100)
    native = fast_bfloat16(torch.device("cpu"))  # --value_dtype auto: bfloat16 only where the CPU runs it natively
    assert (options.ds_name, options.dataset_size_limit, options.value_dtype) == ("cf_flat", 2000, "bfloat16" if native else "float32")
    assert reproduce.parse_args(["--value_dtype", "bfloat16"])[0].value_dtype == "bfloat16"
    assert (options.number_of_few_shots, options.number_of_tests, len(options.downstream_tasks)) == (0, 100, 6)
    assert options.downstream_eval_steps == 500 and commands[alg][-2] == "--results_dir"
    args, extra = reproduce.parse_args(["--study", "alphaedit", "--edits", "2", "--eval_every", "1"])
    small = dict(reproduce.commands("alphaedit", args, extra))[alg]
    assert small[small.index("--dataset_size_limit") + 1] == "2" and small[small.index("--downstream_eval_steps") + 1] == "1"


def test_part_continues_started_runs_starts_the_others_and_leaves_ended_ones(tmp_path, capsys):
    root = tmp_path / "reproduce" / "lifelong"

    def state(label: str, status: str) -> None:
        checkpoint = root / label / label / "run_001" / "checkpoint"
        checkpoint.mkdir(parents=True)
        (checkpoint / "state.json").write_text(json.dumps({"state": {"status": status}, "files": {}, "sizes": {}}))

    state("MEMIT", "paused")
    state("EMMET", "complete")
    state("AlphaEdit", "interrupted")
    args, extra = reproduce.parse_args(["--study", "lifelong", "--runs", "MEMIT,EMMET,AlphaEdit,ENCORE",
                                        "--results_dir", str(tmp_path), "--part", "500", "--", "--number_of_tests", "9"])
    commands = dict(reproduce.commands("lifelong", args, extra))
    assert list(commands) == ["MEMIT", "AlphaEdit", "ENCORE"]  # EMMET has ended
    assert "EMMET" in capsys.readouterr().out
    for label in ("MEMIT", "AlphaEdit"):
        command = commands[label]
        assert command[command.index("--continue_from_run") + 1] == "run_001" and command[command.index("--stop_after") + 1] == "500"
        assert command[command.index("--results_dir") + 1] == str(root / label) and command[-2:] == ["--number_of_tests", "9"]
    assert "--continue_from_run" not in commands["ENCORE"] and commands["ENCORE"][commands["ENCORE"].index("--stop_after") + 1] == "500"
    (root / "ENCORE" / "ENCORE" / "run_001").mkdir(parents=True)  # started, killed before its first checkpoint
    with pytest.raises(KeditError, match="ENCORE/run_001 has no readable checkpoint"):
        reproduce.commands("lifelong", args, extra)
    with pytest.raises(KeditError, match="--part N"):
        reproduce.parse_args(["--study", "lifelong", "--part", "500", "--", "--stop_after", "100"])
