"""What rome/compute_v.py's value optimisation stands on: the batch layout and its table of reads
(layout.py), the replays that give log-probabilities at those reads (replay.py, llama_layer.py)."""
