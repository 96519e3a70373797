"""Issue 33, the atlas's fast mode: each unit stops once its objective has converged
(optvis/convergence.py), the rest of its batch goes on without it, and the atlas says which mode
made its images."""
import json

import numpy as np
import pytest

from deepvis_repro.atlas.optimized import optimize_into_atlas
from deepvis_repro.errors import DeepvisError
from deepvis_repro.optimize import optimize
from deepvis_repro.optvis.convergence import Convergence

#: short enough for a test: checks every 5 steps from step 20, over the last 10 steps
SHORT = Convergence(window=10, rel_tol=0.05, min_steps=20, every=5)


def _best_so_far(history: np.ndarray) -> np.ndarray:
    return np.fmax.accumulate(np.nan_to_num(history, nan=-np.inf), axis=0)


def test_a_converged_unit_stops_where_the_criterion_says_and_keeps_the_exact_runs_image(lite0):
    units = [f"blocks.3:{c}" for c in range(4)]
    exact = optimize(lite0, units, "paper_3", steps=120, progress=False)
    fast = optimize(lite0, units, "paper_3", steps=120, progress=False, converge=SHORT)
    assert exact.converged == {} and not np.isnan(exact.history).any()  # the paper's fixed length
    assert fast.converged, "no unit of blocks.3 converged in 120 steps under a 5% / 10-step criterion"
    best = _best_so_far(exact.history)
    for i in range(len(units)):
        stop = fast.converged.get(i)
        # the criterion, read off the exact run's own curve: the first due check where the last
        # 10 steps gained less than 5% is where the fast run stopped (and none before)
        due = [s for s in range(1, 121) if SHORT.due(s) and s - 1 >= SHORT.window]
        hits = [s - 1 for s in due if best[s - 1, i] - best[s - 1 - SHORT.window, i] < 0.05 * abs(best[s - 1, i])]
        assert stop == (hits[0] if hits else None), (i, stop, hits)
        if stop is None:
            continue
        assert np.isnan(fast.history[stop + 1:, i]).all() and np.isfinite(fast.history[:stop + 1, i]).all()
        # until its stop the unit ran exactly as in the full run (the batch going on without the
        # converged rows rounds alike): the image kept is the full run's best of those steps
        assert fast.best_activation[i] == pytest.approx(best[stop, i], rel=1e-4)
        assert fast.best_activation[i] < exact.best_activation[i] * 1.0001
    # the units that went on did what they would have done in the full run
    going = [i for i in range(len(units)) if i not in fast.converged]
    for i in going:
        assert fast.best_activation[i] == pytest.approx(exact.best_activation[i], rel=1e-3)


def test_bad_criteria_are_one_line():
    with pytest.raises(DeepvisError, match="min_steps >= window"):
        Convergence(window=50, min_steps=10)
    with pytest.raises(DeepvisError, match="rel_tol must be in"):
        Convergence(rel_tol=-0.1)


@pytest.mark.parametrize("width", [4, 2])  # 2: rows freed by converged units go to the next ones
def test_fast_atlas_records_its_mode_resumes_alike_and_refuses_the_exact_mode(lite0, tmp_path, width):
    units = [f"blocks.1:{c}" for c in range(4)]
    r = optimize_into_atlas(lite0, tmp_path, units, steps=60, batch_size=width, progress=False, fast=SHORT)
    assert r["written"] == 4
    rec = json.loads((tmp_path / "regularized_opt" / "blocks.1" / "results.json").read_text())
    assert rec["setting"]["fast"]["convergence"] == SHORT.describe()
    stops = {c: rec["units"][str(c)]["converged_at"] for c in range(4)}
    assert any(s is not None and 20 <= s < 59 for s in stops.values()), stops
    # resumable: a unit lost is made again with the batch it belongs to, to the same picture
    lost = next(c for c, s in stops.items() if s is not None)
    img = tmp_path / "regularized_opt" / "blocks.1" / f"blocks.1_{lost:04d}.jpg"
    before = img.read_bytes()
    img.unlink()
    again = optimize_into_atlas(lite0, tmp_path, units, steps=60, batch_size=width, progress=False, fast=SHORT)
    assert again["written"] == 4 and img.read_bytes() == before
    made = r"made with paper_3 \(60 steps, seed 0, fast mode: under 5% gained over 10 steps, from step 20\)"
    with pytest.raises(DeepvisError, match=made + r"; this run asks paper_3 \(60 steps, seed 0, exact mode\)"):
        optimize_into_atlas(lite0, tmp_path, units, steps=60, batch_size=4, progress=False)
    looser = Convergence(window=10, rel_tol=0.1, min_steps=20, every=5)  # another criterion, other pictures
    with pytest.raises(DeepvisError, match=made + r"; this run asks .*fast mode: under 10% gained over 10 steps"):
        optimize_into_atlas(lite0, tmp_path, units, steps=60, batch_size=4, progress=False, fast=looser)


def test_the_site_says_which_mode_made_a_units_picture_and_where_it_stopped(lite0, tmp_path, photos):
    from PIL import Image

    from deepvis_repro.atlas.mining import mine
    from deepvis_repro.atlas.site import write_site

    paths = []
    for name in ("coffee", "chelsea"):
        Image.fromarray(photos[name]).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    atlas = tmp_path / "A"
    mine(lite0, paths, ["blocks.1"], top_k=2, atlas_dir=atlas, progress=False)
    optimize_into_atlas(lite0, atlas, ["blocks.1:0", "blocks.1:1"], steps=40, batch_size=2, progress=False, fast=SHORT)
    rec = json.loads((atlas / "regularized_opt" / "blocks.1" / "results.json").read_text())
    write_site(atlas)
    for c in (0, 1):
        page = (atlas / "site" / "blocks.1" / f"{c:04d}.html").read_text()
        assert "fast mode: stopped once the last 10 steps gained under 5%, from step 20" in page
        stop = rec["units"][str(c)]["converged_at"]
        assert (f"converged, stopped after step {stop}" in page) == (stop is not None)


def test_the_command_records_the_criterion_and_where_each_unit_stopped(tmp_path):
    import subprocess

    r = subprocess.run(["deepvis-optimize", "units=[blocks.3:0,blocks.3:1]", "optimize.steps=220", "optimize.fast=true",
                        f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "results.json").read_text())
    assert rec["convergence"] == Convergence().describe()
    for u in rec["results"]:
        stop = u["converged_at"]
        steps_run = sum(v is not None for v in u["objective_per_step"])
        # stopped on the criterion's grid (from step 150, every 25), or ran the full 220
        assert (stop is None and steps_run == 220) or (stop in (149, 174, 199) and steps_run == stop + 1), (stop, steps_run)


def test_the_command_takes_another_criterion_and_the_atlas_records_it(tmp_path):
    """optimize.convergence.*: a looser stop (here 10% over 20 steps, checked every 10 from step
    40) stops units on its own grid, and the atlas's record and the command's last line say it."""
    import subprocess

    atlas = tmp_path / "atlas"
    r = subprocess.run(["deepvis-optimize", "units=[blocks.3:0,blocks.3:1,blocks.3:2]", "optimize.steps=120",
                        "optimize.fast=true", "optimize.convergence.rel_tol=0.1", "optimize.convergence.window=20",
                        "optimize.convergence.min_steps=40", "optimize.convergence.every=10", f"atlas.dir={atlas}",
                        f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "converged (under 10% gained over 20 steps, from step 40, every 10) or 120 steps" in r.stdout
    rec = json.loads((atlas / "regularized_opt" / "blocks.3" / "results.json").read_text())
    assert rec["setting"]["fast"]["convergence"] == {"window": 20, "rel_tol": 0.1, "min_steps": 40, "every": 10}
    stops = [u["converged_at"] for u in rec["units"].values()]
    assert any(s is not None for s in stops), stops
    assert all(s is None or (s + 1) % 10 == 0 and s >= 39 for s in stops), stops


def test_a_converged_units_row_goes_to_the_next_unit_and_each_unit_runs_as_alone(lite0):
    """optimize._drive: at most batch_size rows through the network at once; when a unit
    converges the next one starts in its row (a cohort of its own, with its own step count), and
    every unit's run is the one it has in a batch of its own (to batched rounding)."""
    units = [f"blocks.3:{c}" for c in range(6)]
    alone = optimize(lite0, units, "paper_3", steps=90, progress=False, converge=SHORT)  # one batch of 6
    rows_seen = []
    forward = lite0.forward

    def counting(x, layers):
        rows_seen.append(len(x))
        return forward(x, layers)

    lite0.forward = counting
    try:
        refilled = optimize(lite0, units, "paper_3", steps=90, progress=False, converge=SHORT, batch_size=2)
    finally:
        del lite0.forward  # the class's own again
    assert max(rows_seen) == 2
    assert alone.converged, "no unit of blocks.3 converged in 90 steps under a 5% / 10-step criterion"
    assert refilled.converged == alone.converged  # each unit stopped where it stops alone
    np.testing.assert_allclose(refilled.best_activation, alone.best_activation, rtol=1e-3)
    for i in range(len(units)):  # and its record is its own run's, from its own step 0
        steps_run = int(np.isfinite(refilled.history[:, i]).sum())
        assert steps_run == (alone.converged[i] + 1 if i in alone.converged else 90)
        assert np.isfinite(refilled.history[:steps_run, i]).all()
    # fixed batches of 2 would run each pair to its longer unit's stop: a freed row went on at once
    fixed = sum(max(int(np.isfinite(alone.history[:, j]).sum()) for j in (i, i + 1)) for i in (0, 2, 4))
    assert len(rows_seen) < fixed, (len(rows_seen), fixed)
    assert sum(rows_seen) == sum(int(np.isfinite(alone.history[:, i]).sum()) for i in range(6))


def test_a_ctrl_c_among_cohorts_keeps_the_units_started(lite0):
    units = [f"blocks.1:{c}" for c in range(6)]
    calls = []

    def on_step(step, steps):
        calls.append(step)
        if len(calls) == 50:
            raise KeyboardInterrupt

    r = optimize(lite0, units, "paper_3", steps=60, progress=False, converge=SHORT, batch_size=2, on_step=on_step)
    assert r.interrupted
    assert 2 <= len(r.units) <= 6 and [u.channel for u in r.units] == list(range(len(r.units)))  # a prefix
    assert len(r.images) == len(r.units) and np.isfinite(r.best_activation).all()


def test_a_cuda_out_of_memory_keeps_the_finished_units_and_reruns_the_rest_at_half_width(lite0, monkeypatch):
    """A CUDA OOM late in a segment (here raised by the network when a step after the first batch
    has more than 2 rows) costs only the units not finished: those finished stand, bit for bit,
    the rest run at half the width, and the progress bar does not count the lost work twice."""
    import importlib

    import torch

    from deepvis_repro.progress import LineProgress

    optimize_module = importlib.import_module("deepvis_repro.optimize")  # the package's name is the function

    units = [f"blocks.1:{c}" for c in range(8)]
    wide = optimize(lite0, units, "paper_3", steps=3, progress=False, batch_size=4)
    narrow = optimize(lite0, units, "paper_3", steps=3, progress=False, batch_size=2)
    rows_seen, bars = [], []
    forward = lite0.forward

    def tight(x, layers):
        if len(x) > 2 and len(rows_seen) >= 3:  # the first batch of 4 fits, the second does not
            rows_seen.append(-len(x))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        rows_seen.append(len(x))
        return forward(x, layers)

    def bar(**kw):
        bars.append(LineProgress(**kw, every=1e9, file=open("/dev/null", "w")))
        return bars[-1]

    monkeypatch.setattr(optimize_module, "progress_bar", bar)
    lite0.forward = tight
    try:
        r = optimize(lite0, units, "paper_3", steps=3, progress=True, batch_size=4)
    finally:
        del lite0.forward
    # 3 steps of units 0-3, the failed step of 4-7, then 4-5 and 6-7 at 2 rows: 0-3 not run again
    assert rows_seen == [4, 4, 4, -4, 2, 2, 2, 2, 2, 2]
    assert [u.channel for u in r.units] == list(range(8))
    np.testing.assert_array_equal(r.best_activation[:4], wide.best_activation[:4])
    np.testing.assert_array_equal(r.best_activation[4:], narrow.best_activation[4:])
    torch.testing.assert_close(r.x, torch.cat([wide.x[:4], narrow.x[4:]]), rtol=0, atol=0)
    assert bars[0].n == bars[0].total == 3 * 8
