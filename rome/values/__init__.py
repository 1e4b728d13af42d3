"""What rome/compute_v.py's value optimisation stands on (the algorithm and its loss stay in
rome/compute_v.py, next to compute_u.py, where readers of the papers' code look first): the batch
layout and its table of reads (layout.py), the replays that return log-probabilities at those reads
(replay.py, with the stacks they run in stacks.py and the functional Llama layer in llama_layer.py)
and the per-request Adam (adam.py)."""
