"""AlphaEdit: MEMIT-style editing with the update projected onto the null space of the preserved keys."""
