"""Parts of experiments/benchmark.py: the per-device report (device)."""
