"""ROME and r-ROME, and the key/value core every editor shares (compute_u, compute_v)."""
