"""FT-M (EasyEdit's fine-tuning variant, `objective_optimization: target_new`; Zhang et al. 2024's
survey): FT-L's loop (ft/ft_main.py) with the loss on the target tokens only, teacher-forced:

    loss = mean over the target's tokens of -log p(token | prompt, earlier target tokens)

at one layer, unconstrained in EasyEdit's hparams (norm_constraint: null).
"""
from __future__ import annotations

from ft.ft_main import FTHyperParams, apply_ft, tuned_params
from rome.declaration import Editor

EDITOR = Editor("FT-M", FTHyperParams, apply_ft, edits=tuned_params, prepare=None, fixed={"objective": "target_new"})
