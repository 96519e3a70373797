"""deepvis-optimize end to end: files in Hydra's run directory, and one-line errors."""
import json
import subprocess

import numpy as np
import pytest
from PIL import Image


def run(*args, timeout=600):
    return subprocess.run(["deepvis-optimize", *args], capture_output=True, text=True, timeout=timeout)


def test_writes_images_grid_and_record(tmp_path):
    out = tmp_path / "run"
    r = run("units=[fc:130,blocks.10:5]", "regularization=paper_1", "optimize.steps=15",
            "optimize.seed=7", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert {"fc_130.png", "fc_130_nomean.png", "blocks.10_5_7_7.png", "blocks.10_5_7_7_nomean.png",
            "grid.png", "results.json"} <= names
    rec = json.loads((out / "results.json").read_text())
    assert rec["preset"]["name"] == "paper_1" and rec["preset"]["steps"] == 15
    assert rec["backend"] == "efficientnet_lite0" and rec["lr_scale"] == 19.0
    fc = rec["results"][0]
    assert fc["unit"] == "fc:130" and fc["label"] == "flamingo"
    assert len(fc["objective_per_step"]) == 15 and len(fc["image_top5"]) == 5
    assert fc["best_activation"] == pytest.approx(max(v for v in fc["objective_per_step"] if v is not None))
    img = np.asarray(Image.open(out / "fc_130.png"))
    assert img.shape == (224, 224, 3) and img.std() > 0.5
    assert "fc:130 (flamingo): best" in r.stdout


@pytest.mark.parametrize("args, msg", [
    (["unit=fc:1000"], "channel 1000 out of range; layer fc has channels 0..999"),
    (["unit=fc7:3"], "unknown layer 'fc7'"),
    (["regularization=paper_9"], "unknown regularization 'paper_9'"),
    (["regularization.small_norm_pct=150"], "small_norm_pct must be a percentile in [0, 100]"),
    (["regularization.decay=-0.5"], "decay must be in [0, 1]"),
    (["optimize.fast=maybe"], "optimize.fast must be true or false, got 'maybe'"),
    (["optimize.pre_activation=sometimes"], "optimize.pre_activation must be true or false, got 'sometimes'"),
    (["optimize.convergence.rel_tol=0.05"], "optimize.convergence.rel_tol is the fast mode's stop: add optimize.fast=true"),
    (["optimize.fast=true", "optimize.convergence.rel_tol=lots"], "optimize.convergence.rel_tol must be a number"),
    (["optimize.fast=true", "optimize.convergence.window=0"], "optimize.convergence.window must be at least 1"),
    (["optimize.fast=true", "optimize.convergence.min_steps=10"], "min_steps >= window"),
    (["optimize.fast=true", "optimize.convergence.rel_tol=1.5"], "optimize.convergence.rel_tol must be"),
])
def test_user_errors_are_one_line(tmp_path, args, msg):
    r = run(*args, "optimize.steps=2", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
