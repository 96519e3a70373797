"""Issue 33, every unit's picture: a unit whose value is a ReLU6's output (the embedded model's
stem, head, and pool, head's average) is stuck at the start image or at the clamp's top under
the paper's objective; optimize.pre_activation=true optimizes it before the clamp
(optvis/preactivation.py)."""
import json

import numpy as np

import pytest
import torch
from torch import nn

from deepvis_repro.atlas.optimized import optimize_into_atlas
from deepvis_repro.backend import HookBackend
from deepvis_repro.errors import DeepvisError
from deepvis_repro.optimize import optimize, start_images
from deepvis_repro.optvis.preactivation import layer_clamp
from deepvis_repro.units import gather_units, resolve_units

#: head's first channels: the clamp is off at the start image for all but head:2 (measured)
HEAD = [f"head:{c}" for c in range(4)]


def test_the_clamp_is_found_on_the_layer_or_under_its_average_pool(lite0):
    assert layer_clamp(lite0, "head") == "_head_act"  # the layer's own module is the ReLU6
    assert layer_clamp(lite0, "pool") == "_head_act"  # the average pool reads head's ReLU6 directly
    assert layer_clamp(lite0, "stem") == "_stem_act"
    # a block's output is its linear bottleneck, fc a linear layer: nothing to take off
    assert layer_clamp(lite0, "blocks.3") is None and layer_clamp(lite0, "fc") is None


def test_head_units_stuck_under_the_papers_objective_get_a_picture_before_the_clamp(lite0):
    paper = optimize(lite0, HEAD, "paper_3", steps=40, progress=False)
    # the paper's objective: every unit stops within a step or two (zero gradient: the clamp is
    # off, or the first step overshoots it) and keeps an image at the start noise's distance
    assert set(paper.stopped) == set(range(4)) and max(s for s, _ in paper.stopped.values()) <= 2
    pre = optimize(lite0, HEAD, "paper_3", steps=40, progress=False, pre_activation=True)
    assert pre.stopped == {} and pre.pre_activation == {"head": "_head_act"}
    start = start_images(lite0, 4, "mean_plus_rand", 0)
    moved = lambda r: (r.x - start).flatten(1).pow(2).mean(1).sqrt()  # RMS change from the start, 0..255
    assert (moved(pre) > 4 * moved(paper)).all(), (moved(pre), moved(paper))
    # the pre-activation climbed from below zero (the clamp off) for the whole run (blur's 4-step
    # saw-tooth aside), and the picture turns the unit itself on
    assert (pre.history[0][[0, 1, 3]] < 0).all() and (pre.best_step >= 25).all()
    assert (pre.best_activation - pre.history[0] > 5).all(), (pre.history[0], pre.best_activation)
    with torch.no_grad():
        units = resolve_units(lite0, HEAD)
        value = gather_units(lite0.forward(pre.x, ["head"]), units, lite0)
        before = gather_units(lite0.forward(start, ["head"]), units, lite0)
    assert (value > before).all() and (value > 1.0).all(), (value, before)
    # the module's own forward is back after the run: head's values are clamped again
    assert float(value.max()) <= 6.0


def test_layers_without_a_clamp_and_mixed_batches_keep_the_papers_images(lite0):
    pre = optimize(lite0, ["fc:1", "head:0", "blocks.3:2"], "paper_3", steps=15, progress=False,
                   pre_activation=True, batch_size=3)
    # one batch per layer: head's clamp taken off never reaches fc's values
    assert pre.pre_activation == {"fc": None, "head": "_head_act", "blocks.3": None}
    alone = [optimize(lite0, [u], "paper_3", steps=15, progress=False) for u in ("fc:1", "blocks.3:2")]
    assert torch.equal(pre.x[0], alone[0].x[0]) and torch.equal(pre.x[2], alone[1].x[0])
    assert pre.best_activation[0] == alone[0].best_activation[0]


def test_the_atlas_records_it_for_clamped_layers_only_and_refuses_a_mix(lite0, tmp_path):
    r = optimize_into_atlas(lite0, tmp_path, ["head:0", "head:1", "blocks.1:0"], steps=10, batch_size=2,
                            progress=False, pre_activation=True)
    assert r["written"] == 3
    head = json.loads((tmp_path / "regularized_opt" / "head" / "results.json").read_text())
    block = json.loads((tmp_path / "regularized_opt" / "blocks.1" / "results.json").read_text())
    assert head["setting"]["pre_activation"] == "_head_act" and "pre_activation" not in block["setting"]
    assert all(u["stopped"] is None and u["best_activation"] > 0 for u in head["units"].values())
    # blocks.1's images are the paper's either way: the same atlas takes it without the option
    again = optimize_into_atlas(lite0, tmp_path, ["blocks.1:0"], steps=10, batch_size=2, progress=False)
    assert again["skipped"] == 1
    with pytest.raises(DeepvisError, match=r"optimized before _head_act\); this run asks paper_3 \(10 steps, "
                                           r"seed 0, exact mode\)"):
        optimize_into_atlas(lite0, tmp_path, ["head:2"], steps=10, batch_size=2, progress=False)


def test_the_command_records_what_was_optimized(tmp_path):
    import subprocess

    r = subprocess.run(["deepvis-optimize", "units=[pool:0,fc:3]", "optimize.steps=12", "optimize.pre_activation=true",
                        f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "results.json").read_text())
    assert rec["pre_activation"] == {"pool": "_head_act", "fc": None}
    pool = rec["results"][0]
    # pool:0's clamp is off at the start image: the paper's objective has no gradient there,
    # its pre-activation (the average of head's) climbs
    assert pool["stopped"] is None and pool["objective_per_step"][-1] > pool["objective_per_step"][0]


class _SharedReLU(nn.Module):
    """One ReLU6 module called twice (as torchvision's Bottleneck calls its ReLU), the second time
    before an average pool; and one called once before another pool."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)
        self.shared, self.last = nn.ReLU6(), nn.ReLU6()
        self.pool1, self.pool2 = nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = self.pool1(self.shared(self.c2(self.shared(self.c1(x)))))
        return self.pool2(self.last(self.c3(h))).flatten(1)


def test_a_clamp_used_twice_on_the_way_is_never_taken_off():
    b = HookBackend(_SharedReLU().eval(), [("shared", "shared"), ("pool1", "pool1"), ("pool2", "pool2")],
                    to_input=lambda x: x / 255, mean=[128.0] * 3, input_size=(16, 16))
    # a layer that is a reused module is its first call (the forward stops there): that one call
    assert layer_clamp(b, "shared") == "shared"
    # pool1 reads the second call: taking the module off would change the first one too
    assert layer_clamp(b, "pool1") is None
    assert layer_clamp(b, "pool2") == "last"


class _Loader:
    def invalidate(self, layer, unit):
        pass


def _on_demand_image(lite0, root, pre_activation):
    """The live view's background job, run to the end on head:0 (as when the cursor rests on it)."""
    import time

    from PIL import Image

    from deepvis_repro.atlas.store import AtlasStore
    from deepvis_repro.live.ondemand import OnDemand

    od = OnDemand(lite0, str(root), _Loader(), steps=30, rest_seconds=0, pre_activation=pre_activation)
    od.start()
    od.request("head", 0)
    deadline = time.time() + 300
    while not od.done and not od.failed and time.time() < deadline:
        time.sleep(0.1)
    od.stop.set()
    od.join(10)
    assert od.done and not od.failed, od.failed
    rec = json.loads((root / "regularized_opt" / "head" / "results.json").read_text())["on_demand"]["0"]
    path = AtlasStore(root).unit_file("regularized_opt", "head", 0)
    return np.asarray(Image.open(path)).astype(float), rec


def test_the_live_views_on_demand_image_of_a_head_unit_is_made_before_the_clamp(lite0, tmp_path):
    x = start_images(lite0, 1, "mean_plus_rand", 0)
    with torch.no_grad():
        before = lite0.forward(x, ["head"])["head"]
    paper, rec_paper = _on_demand_image(lite0, tmp_path / "paper", pre_activation=False)
    pre, rec_pre = _on_demand_image(lite0, tmp_path / "pre", pre_activation=True)
    assert rec_pre["pre_activation"] == "_head_act" and "pre_activation" not in rec_paper
    # head:0's clamp is off at the start: the paper's objective leaves the start noise, the value
    # before the clamp climbs, so the two pictures differ (RMS over pixels, 0..255)
    assert np.sqrt(((pre - paper) ** 2).mean()) > 5
    assert rec_pre["best_activation"] > rec_paper["best_activation"]
    # the clamp came off the job's own copy of the model only: the view's network is untouched
    with torch.no_grad():
        assert torch.equal(lite0.forward(x, ["head"])["head"], before)
    assert before.max() <= 6


def test_an_atlas_records_bf16_numerics_and_refuses_to_mix_them_with_float32(lite0, tmp_path):
    from deepvis_repro.bf16 import runs_bf16

    if not runs_bf16("cpu"):
        pytest.skip("this CPU has no native bfloat16: numerics=bf16 runs float32 and records none")
    r = optimize_into_atlas(lite0, tmp_path, ["blocks.2:0", "blocks.2:1"], steps=8, batch_size=2,
                            progress=False, numerics="bf16", fast=True)
    assert r["written"] == 2 and r["numerics"] == "bf16"
    rec = json.loads((tmp_path / "regularized_opt" / "blocks.2" / "results.json").read_text())
    assert rec["setting"]["numerics"] == "bf16"
    # the images are bfloat16's: the float32 run of the same batch differs in its rounding
    f32 = optimize(lite0, ["blocks.2:0", "blocks.2:1"], "paper_3", steps=8, progress=False)
    assert rec["units"]["0"]["best_activation"] != float(f32.best_activation[0])
    fast = r"fast mode: under 2% gained over 50 steps, from step 150"
    with pytest.raises(DeepvisError, match=fast + r", numerics bf16\); this run asks paper_3 \(8 steps, "
                                           r"seed 0, " + fast + r"\)"):
        optimize_into_atlas(lite0, tmp_path, ["blocks.2:2"], steps=8, batch_size=2, progress=False, fast=True)


def test_an_atlas_asked_for_bf16_on_a_cpu_without_it_records_the_float32_it_ran(lite0, tmp_path, monkeypatch):
    import deepvis_repro.numerics as numerics

    # as on a CPU without native bfloat16: the optimizer computes in float32 (numerics.Numerics)
    monkeypatch.setattr(numerics, "runs_bf16", lambda kind: False)
    r = optimize_into_atlas(lite0, tmp_path, ["blocks.2:0"], steps=4, batch_size=1, progress=False,
                            numerics="bf16")
    assert r["numerics"] == "default"
    rec = json.loads((tmp_path / "regularized_opt" / "blocks.2" / "results.json").read_text())
    assert "numerics" not in rec["setting"]
    f32 = optimize(lite0, ["blocks.2:0"], "paper_3", steps=4, progress=False)
    assert rec["units"]["0"]["best_activation"] == float(f32.best_activation[0])
