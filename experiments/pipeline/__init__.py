"""The run pipeline behind experiments/evaluate.py: options (run_config), opening or continuing a
run (session), the edit-measure-checkpoint loop (run), the run folder on disk (checkpoint,
runlock), the measurements applied at each point (evals), update health and model export."""
