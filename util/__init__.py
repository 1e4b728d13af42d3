"""Shared infrastructure: model loading, tracing, hparams, statistics, the update solver."""
