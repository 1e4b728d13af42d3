"""UltraEdit: lifelong, training-free editing by a closed-form update with running normalisation."""
