"""The optimizer's parts, each with one job (as Lucent's optvis): the paper's regularizers, the
settings (presets), image parametrizations (pixels as the paper, Fourier/decorrelated as Lucid,
phase-only as MACO), natural-image statistics they need, robustness transforms and step rules.
deepvis_repro/optimize.py is the loop that joins them."""
