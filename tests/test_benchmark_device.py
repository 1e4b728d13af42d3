"""The device report of experiments/benchmark.py (--device / random:<shape>), as a smoke run on
the CPU: one edit per editor on a tiny random model, and the statistics pass."""
import re
import sys

import pytest

from editors import load_algorithm_hparams
from experiments import benchmark

TINY = ["--set", "layers=[1]", "--set", "v_loss_layer=3", "--set", "v_num_grad_steps=2", "--set", "mom2_n_samples=2",
        "--set", "mom2_sample_tokens=64", "--set", "context_template_length_params=[[5,2]]"]


def test_device_report_on_a_random_shape(shared_data, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--model_name", "random:tiny", "--device", "cpu", "--algs", "R-ROME,AlphaEdit",
                                      "--batches", "1,2", "--stats_windows", "2", "--value_chunk_size", "1", "--data_dir", str(shared_data), *TINY])
    assert benchmark.main() == 0
    out = capsys.readouterr().out
    assert re.search(r"random:tiny \(0\.\d+ B parameters, torch\.float32\) on CPU; measured bf16 matmul peak \d+ GFLOP/s", out)
    assert "value replay of random:tiny (llama, values in float32): ModuleReplay, transformers' modules of the upper layers" in out
    for alg in ("R-ROME", "AlphaEdit"):
        for batch in (1, 2):
            assert re.search(rf"\| {alg} batch {batch} \| [\d.e+-]+ s/edit \| peak memory n/a \(CPU\); GPU utilisation n/a \|", out), out
    assert re.search(r"\| key statistics, layers \[1\], 1024 tokens, float32 \| \d+ tokens/s \| \d+ GFLOP/s", out), out


@pytest.mark.parametrize("algs, overrides", [("FT-L,FT-M", ["--set", "layers=[1]", "--set", "num_steps=2"]),
                                             ("UltraEdit", ["--set", "modules={mlp_gate: [1], mlp_down: [2]}"])])
def test_device_report_times_the_editors_without_a_solver(shared_data, monkeypatch, capsys, algs, overrides):
    """Fine-tuning and UltraEdit are timed like the others; no key statistics are read for them. (The
    matmul peak, a minute of bfloat16 products on a loaded CPU, is the test above's business.)"""
    from experiments.benchmarking import device

    monkeypatch.setattr(device, "matmul_peak_on", lambda _device: 1.0)
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--model_name", "random:tiny", "--device", "cpu", "--algs", algs,
                                      "--batches", "1,2", "--stats_windows", "2", "--data_dir", str(shared_data), *overrides])
    assert benchmark.main() == 0
    out = capsys.readouterr().out
    for alg in algs.split(","):
        for batch in (1, 2):
            assert re.search(rf"\| {alg} batch {batch} \| [\d.e+-]+ s/edit \| peak memory n/a \(CPU\); GPU utilisation n/a \|", out), out
    assert "key statistics" not in out


def test_an_editor_refused_gets_its_error_row_and_the_others_still_run(shared_data, monkeypatch, capsys):
    """As on an H200 at the Llama-3-8B shape: random weights' C0 had no eigenvalue below AlphaEdit's
    threshold. Here a threshold of 1e-30 empties the null space; R-ROME after it is still timed."""
    from experiments.benchmarking import device

    monkeypatch.setattr(device, "matmul_peak_on", lambda _device: 1.0)
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--model_name", "random:tiny", "--device", "cpu", "--algs", "AlphaEdit,R-ROME",
                                      "--batches", "1,2", "--stats_windows", "0", "--data_dir", str(shared_data), *TINY])
    monkeypatch.setattr(device, "load_algorithm_hparams", lambda alg, file, overrides: load_algorithm_hparams(
        alg, file, [*overrides, *(["nullspace_threshold=1e-30"] if alg == "AlphaEdit" else [])]))
    assert benchmark.main() == 1
    out = capsys.readouterr().out
    assert re.search(r"\| AlphaEdit batch 1 \| error: layer .*: the null space is empty .* \| \|", out), out
    assert "AlphaEdit batch 2" not in out  # its larger batches would stop the same way
    for batch in (1, 2):
        assert re.search(rf"\| R-ROME batch {batch} \| [\d.e+-]+ s/edit \|", out), out


def test_the_plan_of_a_shape_on_meta_is_the_plan_of_the_model_itself(shared_data, caches):
    # benchmark.py --plan builds the model on 'meta' (no weights): its plan must be the one the
    # edit would make on the model in memory, for every editor, placement and batch size.
    from data.cases import load_cases
    from experiments.benchmarking.plan import plan_rows
    from util.models import load_model, shape_model

    requests = [r.request for r in load_cases("cf", shared_data, limit=8)]
    meta, real = shape_model("random:tiny", model_cache=caches.models), load_model("random:tiny", model_cache=caches.models)
    assert all(p.device.type == "meta" for p in meta.model.parameters())
    algs, overrides = ["R-ROME", "MEMIT", "AlphaEdit"], TINY[1::2]
    plans = {}
    for budget in (0.01, 0.02, 1.0):  # too small for the weights and one request; one value request; all
        rows = plan_rows(meta, requests, algs, [1, 8], "smollm2-135m.yaml", overrides, "float32", budget)
        assert rows == plan_rows(real, requests, algs, [1, 8], "smollm2-135m.yaml", overrides, "float32", budget)
        assert [(r.alg, r.batch) for r in rows] == [("R-ROME", 1), ("MEMIT", 1), ("MEMIT", 8), ("AlphaEdit", 1), ("AlphaEdit", 8)]
        plans[budget] = {(r.alg, r.batch): r for r in rows}
    assert all("cannot hold an edit of random:tiny" in r.error for r in plans[0.01].values())
    assert plans[0.02]["MEMIT", 8].value_chunk < 8 == plans[1.0]["MEMIT", 8].value_chunk
    assert 0 < plans[0.02]["MEMIT", 8].peak_gib <= 0.02 * 0.9


def test_plan_command_prints_a_row_per_editor_and_batch(shared_data, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--plan", "--model_name", "random:tiny", "--algs", "R-ROME,EMMET",
                                      "--batches", "1,4", "--max_gpu_memory", "1", "--data_dir", str(shared_data), *TINY])
    assert benchmark.main() == 0
    out = capsys.readouterr().out
    assert "not a measurement" in out
    assert re.search(r"\| R-ROME \| 1 \| device \| 1 / 1 \| [\d.e-]+ GiB \|", out), out
    for batch in (1, 4):
        assert re.search(rf"\| EMMET \| {batch} \| (device|host) \| {batch} / {batch} \| [\d.e-]+ GiB \|", out), out


def test_the_blocks_live_at_a_traces_peak_are_grouped_by_the_lines_that_made_them():
    # an allocator trace as torch.cuda.memory._snapshot() gives it: blocks made by this repository's
    # lines (innermost frame first) or by none of them, freed, and a block from before the trace freed
    from experiments.benchmarking.device import REPO, blocks_at_peak, blocks_markdown, where_made

    solve = [{"filename": f"{REPO}/util/solve.py", "line": 132, "name": "solve_least_squares"},
             {"filename": f"{REPO}/.venv/lib/torch/x.py", "line": 1, "name": "inner"},
             {"filename": f"{REPO}/rome/editor.py", "line": 188, "name": "_solve_layer"}]
    torch_only = [{"filename": "/usr/lib/python3/torch/y.py", "line": 2, "name": "f"}]
    trace = [{"action": "alloc", "addr": 1, "size": 100, "frames": solve},
             {"action": "free_completed", "addr": 99, "size": 40},  # allocated before the trace
             {"action": "alloc", "addr": 2, "size": 30, "frames": solve},
             {"action": "alloc", "addr": 3, "size": 50, "frames": torch_only},
             {"action": "free_requested", "addr": 3, "size": 50},
             {"action": "free_completed", "addr": 3, "size": 50},
             {"action": "alloc", "addr": 4, "size": 10, "frames": torch_only}]
    blocks = blocks_at_peak(trace, base=1000)
    # 1000 + 100 - 40 + 30 + 50 = 1140 at the peak; the block of 10 came after it
    assert blocks.peak == 1140
    here = "util/solve.py:132 solve_least_squares <- rome/editor.py:188 _solve_layer"
    assert where_made(solve) == here and where_made(torch_only) == "(no frame of this repository)"
    assert blocks.groups == [(here, 130, 2), ("(no frame of this repository)", 50, 1)]
    text = blocks_markdown({"MEMIT batch 1": blocks}, gib=1)
    assert text.splitlines()[0] == "MEMIT batch 1: peak 1140.00 GiB; live then, beyond what was allocated before the edit:"
    assert "130.000 GiB in    2 blocks  " + here in text


def test_tracing_memory_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--model_name", "random:tiny", "--device", "cpu", "--trace_memory"])
    with pytest.raises(SystemExit):
        benchmark.main()
    assert "--trace_memory needs --device cuda" in capsys.readouterr().err
