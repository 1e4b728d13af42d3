"""PRUNE: MEMIT with the large singular values of the run's accumulated update restrained."""
