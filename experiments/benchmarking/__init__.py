"""Parts of experiments/benchmark.py: the per-device report (device), the memory plan (plan) and the
evaluation against its straightforward path (evaluation)."""
