"""The optimizer on the embedded EfficientNet-Lite0 (real ImageNet weights)."""
import numpy as np
import pytest
import torch
from torch import nn

from deepvis_repro.backend import HookBackend
from deepvis_repro.errors import DeepvisError
from deepvis_repro.optimize import PRESETS, optimize
from conftest import top_labels

#: the paper's settings and plain ascent (pixels); the successors have tests of their own
PAPER_PRESETS = sorted(n for n, p in PRESETS.items() if p.param == "pixels")


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_every_preset_raises_its_unit(lite0, preset):
    r = optimize(lite0, ["fc:130", "blocks.10:5"], preset=preset, steps=25, progress=False)
    start = r.history[0]
    assert r.history.shape == (25, 2)
    assert np.all(r.best_activation > start + 1.0), (r.best_activation, start)
    assert np.all(r.best_step > 0)
    assert r.images.shape == (2, 224, 224, 3) and r.images.dtype == np.uint8
    # the stored best image really has the best activation
    with torch.no_grad():
        acts = lite0.forward(r.x, ["fc", "blocks.10"])
    assert float(acts["fc"][0, 130]) == pytest.approx(r.best_activation[0], rel=1e-4)
    assert float(acts["blocks.10"][1, 5, 7, 7]) == pytest.approx(r.best_activation[1], rel=1e-4)


def test_same_seed_same_image_and_other_seed_differs(lite0):
    a = optimize(lite0, "fc:144", preset="paper_1", steps=12, seed=3, progress=False)
    b = optimize(lite0, "fc:144", preset="paper_1", steps=12, seed=3, progress=False)
    c = optimize(lite0, "fc:144", preset="paper_1", steps=12, seed=4, progress=False)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.history, b.history)
    assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_batch_equals_single_runs(lite0, preset):
    """Each image in a batch follows its own single run. Batched and single convolutions round
    differently (~1e-7), and long ascents amplify that (paper_4's 90th-percentile clipping
    within two steps), so the check covers the first update, where they agree to float precision."""
    units = ["fc:130", "fc:366", "blocks.5:3", "stem:7:50:60"]
    batch = optimize(lite0, units, preset=preset, steps=2, seed=1, progress=False)
    for i, u in enumerate(units):
        single = optimize(lite0, [u], preset=preset, steps=2, seed=1, progress=False)
        assert str(batch.units[i]) == str(single.units[0])
        np.testing.assert_allclose(batch.history[:, i], single.history[:, 0], rtol=1e-4, atol=1e-4)
        diff = np.abs(batch.images[i].astype(int) - single.images[0].astype(int))
        assert diff.max() <= 1, (u, diff.max())
    split = optimize(lite0, units, preset=preset, steps=2, seed=1, progress=False, batch_size=3)
    np.testing.assert_allclose(split.history, batch.history, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_flamingo_full_paper_3_run(lite0):
    r = optimize(lite0, "fc:130", preset="paper_3", seed=0, progress=False)
    assert r.history.shape[0] == 1000
    assert "flamingo" in top_labels(lite0, r.images[0], 5)
    assert r.best_activation[0] > 20


@pytest.mark.parametrize("units, kw, msg", [
    (["fc:1000"], {}, r"channel 1000 out of range; layer fc has channels 0..999"),
    (["blocks.5:3:14:0"], {}, r"position \(14, 0\) out of range; layer blocks.5 is 14x14"),
    (["fc7:1"], {}, r"unknown layer 'fc7'"),
    (["fc-130"], {}, r"bad unit 'fc-130'"),
    (["fc:1"], {"small_norm_pct": 120}, r"small_norm_pct must be a percentile"),
    (["fc:1"], {"decay": -1}, r"decay must be in"),
    (["fc:1"], {"preset": "paper_9"}, r"unknown preset 'paper_9'; valid: lucid, maco, none, paper_1"),
])
def test_bad_units_and_values(lite0, units, kw, msg):
    with pytest.raises(DeepvisError, match=msg):
        optimize(lite0, units, steps=2, progress=False, **kw)


class _NaNAfter(nn.Module):
    """A small real network whose output 1 of image 1 turns NaN from the 4th batch-of-2 forward on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += x.shape[0] == 2
        y = torch.relu(self.conv(x)).mean((2, 3))
        if self.calls >= 4:
            y = y.clone()
            y[1, 1] = torch.nan  # only image 1's unit: the other image's gradient stays clean
        return y


def test_nan_stops_that_unit_only_and_keeps_its_best():
    net = _NaNAfter()
    b = HookBackend(nn.Sequential(net), [("out", "0")], to_input=lambda x: x / 255,
                    mean=[128.0] * 3, input_size=(16, 16), prob=False)
    b.layer_layout("out")  # the layout probe's pass (a batch of 2) is not one of the optimizer's
    net.calls = 0
    r = optimize(b, ["out:0", "out:1"], preset="paper_3", steps=8, progress=False)
    assert r.stopped[1] == (3, "NaN or inf in the objective or gradient")
    assert "NaN" not in r.stopped.get(0, (0, ""))[1]  # the other unit is not stopped by it
    assert np.isnan(r.history[3:, 1]).all() and np.isfinite(r.history[:4, 0]).all()
    assert r.best_step[1] in (0, 1, 2) and np.isfinite(r.best_activation[1])
    assert np.isfinite(r.x.numpy()).all()


def test_a_signal_between_a_steps_records_keeps_every_result(lite0, monkeypatch):
    """Ctrl-C after a step's argmax was recorded but before its objective: the step is dropped
    whole, and the images and records of the steps before it are kept."""
    real = torch.isfinite
    calls = {"n": 0}

    def interrupted_isfinite(t):
        calls["n"] += 1
        if calls["n"] == 3:  # inside step 1, between the argmax and the history append
            raise KeyboardInterrupt
        return real(t)

    monkeypatch.setattr(torch, "isfinite", interrupted_isfinite)
    r = optimize(lite0, ["fc:1", "fc:2", "fc:3", "fc:4"], preset="paper_3", steps=10, progress=False)
    assert r.interrupted and r.history.shape == r.argmax.shape == (1, 4)
    assert r.images.shape == (4, 224, 224, 3) and np.all(r.best_step == 0)
