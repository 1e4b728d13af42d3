"""FT-M: fine-tuning on the target tokens only (EasyEdit's variant), declared on FT-L's loop."""
