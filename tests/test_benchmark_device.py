"""The device report of experiments/benchmark.py (--device / random:<shape>), as a smoke run on
the CPU: one edit per editor on a tiny random model, and the statistics pass."""
import re
import sys

from experiments import benchmark

TINY = ["--set", "layers=[1]", "--set", "v_loss_layer=3", "--set", "v_num_grad_steps=2", "--set", "mom2_n_samples=2",
        "--set", "mom2_sample_tokens=64", "--set", "context_template_length_params=[[5,2]]"]


def test_device_report_on_a_random_shape(shared_data, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--model_name", "random:tiny", "--device", "cpu", "--algs", "R-ROME,AlphaEdit",
                                      "--batches", "1,2", "--stats_windows", "2", "--value_chunk_size", "1", "--data_dir", str(shared_data), *TINY])
    assert benchmark.main() == 0
    out = capsys.readouterr().out
    assert re.search(r"random:tiny \(0\.\d+ B parameters, torch\.float32\) on CPU; measured bf16 matmul peak \d+ GFLOP/s", out)
    for alg in ("R-ROME", "AlphaEdit"):
        for batch in (1, 2):
            assert re.search(rf"\| {alg} batch {batch} \| [\d.e+-]+ s/edit \| peak memory n/a \(CPU\); GPU utilisation n/a \|", out), out
    assert re.search(r"\| key statistics, layers \[1\], 1024 tokens, float32 \| \d+ tokens/s \| \d+ GFLOP/s", out), out
