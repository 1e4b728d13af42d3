"""FT-L: constrained fine-tuning of the edited layers (the ROME paper's baseline); its loop serves FT-M too."""
