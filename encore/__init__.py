"""ENCORE: MEMIT with a norm term, the run's earlier keys, and most-probable early stopping."""
