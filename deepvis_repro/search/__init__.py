"""The paper's hyperparameter search, rerun for any backbone on Ray Tune (deepvis-search):
sample settings (space.py), optimize and score them on search units (panel.py, trial.py), run
the trials on Ray Tune with early stopping and a ledger that survives kills (tuning.py), and
keep four best settings that differ as presets, validated on held-out units (select.py,
validate.py)."""
