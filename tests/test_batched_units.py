"""A batch of units is read with one op per layer, not one per unit: on a GPU every op is a kernel
launch, and the per-unit select chains added ~12,000 of them to a step of 256 units (README, "On a
GPU"). Each unit must still read, and send its gradient to, its own image only."""
from types import SimpleNamespace

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from deepvis_repro.layout import PREFIX
from deepvis_repro.optimize import _argmax_channels, optimize
from deepvis_repro.units import Unit, gather_units, resolve_units


def _photo_batch(lite0, photos, n):
    names = sorted(photos)
    return torch.cat([lite0.preprocess(photos[names[i % len(names)]]) for i in range(n)])


def test_each_unit_reads_its_own_image_and_only_it_gets_the_gradient(lite0, photos):
    """Units of three layers (one with a position off the centre) in mixed order, on real photos:
    the values are those of per-unit indexing, and the gradient of each value lands on that
    unit's element of its own image and nowhere else."""
    units = resolve_units(lite0, ["fc:281", "blocks.10:4", "fc:7", "head:11:2:5", "blocks.10:90:0:13", "fc:281"])
    x = _photo_batch(lite0, photos, len(units))
    with torch.no_grad():
        acts = lite0.forward(x, ["blocks.10", "head", "fc"])
    leaves = {k: v.clone().requires_grad_(True) for k, v in acts.items()}
    got = gather_units(leaves, units)
    want = torch.stack([acts[u.layer][i, u.channel] if u.y is None else acts[u.layer][i, u.channel, u.y, u.x]
                        for i, u in enumerate(units)])
    assert torch.equal(got, want)
    assert got[0] != got[5]  # the same unit on two photos: its own image each time
    weights = torch.arange(1.0, len(units) + 1)
    (got * weights).sum().backward()
    for name, leaf in leaves.items():
        expect = torch.zeros_like(leaf)
        for i, u in enumerate(units):
            if u.layer == name:
                expect[(i, u.channel) if u.y is None else (i, u.channel, u.y, u.x)] = weights[i]
        assert torch.equal(leaf.grad, expect), name


def test_prefix_token_units_read_the_named_token():
    """A ViT's class-token units (layer:channel:cls) beside patch units of the same layer."""
    backend = SimpleNamespace(layer_layout=lambda layer: SimpleNamespace(prefix=("cls", "dist")))
    grid = torch.randn(3, 5, 4, 4)
    tokens = torch.randn(3, 5, 2)
    acts = {"blocks.2": grid, "blocks.2" + PREFIX: tokens}
    units = [Unit("blocks.2", 1, token="dist"), Unit("blocks.2", 3, 1, 2), Unit("blocks.2", 4, token="cls")]
    got = gather_units(acts, units, backend)
    assert torch.equal(got, torch.stack([tokens[0, 1, 1], grid[1, 3, 1, 2], tokens[2, 4, 0]]))


def test_argmax_record_is_each_rows_argmax_and_minus_one_for_rows_that_did_not_run(lite0, photos):
    units = resolve_units(lite0, ["fc:1", "blocks.10:4:3:9", "fc:2", "blocks.10:8"])
    x = _photo_batch(lite0, photos, len(units))
    with torch.no_grad():
        acts = lite0.forward(x, ["blocks.10", "fc"])
    every = _argmax_channels(acts, units, None)
    assert every.tolist() == [int(acts["fc"][0].argmax()), int(acts["blocks.10"][1, :, 3, 9].argmax()),
                              int(acts["fc"][2].argmax()), int(acts["blocks.10"][3, :, 7, 7].argmax())]
    # units 0 and 3 have converged: the network saw the other two, as its rows 0 and 1
    sub = {1: 0, 2: 1}
    part = _argmax_channels({k: v[[1, 2]] for k, v in acts.items()}, units, sub)
    assert part.tolist() == [-1, every[1].item(), every[2].item(), -1]


def _ops(backend, units, steps) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        optimize(backend, units, steps=steps, progress=False)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def test_a_step_dispatches_as_many_ops_for_twenty_units_as_for_two(lite0):
    """The ops one step adds (what a run of 4 steps dispatches beyond a run of 2), for 2 and 20
    units of a conv layer: before, each unit added ~47 (its select chain, its backward and its
    argmax record), i.e. ~12,000 kernel launches per step at the atlas's GPU batch of 256."""
    per_step = {}
    for n in (2, 20):
        units = [f"blocks.4:{c}" for c in range(n)]
        optimize(lite0, units, steps=1, progress=False)  # shapes probed, calibration made
        per_step[n] = (_ops(lite0, units, 4) - _ops(lite0, units, 2)) / 2
    assert per_step[2] > 100  # the network's own ops were counted
    assert per_step[20] <= per_step[2] + 4, per_step
    assert np.isfinite(per_step[20])
