"""Calibrate the harness's rounding criterion (reproduce/compare.py): how similar are images that
differ only by rounding, and how similar are images whose setting really changed?

Rounding twins: the quick profile's units and settings, run in portable numerics and in default
numerics with 1 and with 2 threads (three arithmetic paths whose bits differ; each pair is a twin).
Real changes, each against the portable run: blur sigma 1.0 -> 0.7, decay x10 (paper_3), small-norm
percentile 50 -> 40 (paper_1), learning rate x2 (paper_3), another seed, another unit.

    python benchmarks/calibrate_comparison.py [--steps 80]

Prints, per kind, how far the first objective values of the two runs are apart (the trajectory
criterion the harness uses) and their SSIM (which, measured here, cannot tell the two apart).
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

import deepvis_repro as dv
from deepvis_repro.optimize import get_preset, optimize
from deepvis_repro.reproduce.compare import (DEFAULT_MEDIAN_TOLERANCE, DEFAULT_MIN_SSIM, DEFAULT_TRAJECTORY_TOLERANCE,
                                              TRAJECTORY_STEPS, trajectory_difference)
from deepvis_repro.reproduce.harness import profile_units
from deepvis_repro.reproduce.metrics import ssim


def run(backend, units, preset, steps, numerics="portable", threads=2, seed=0, **over):
    torch.set_num_threads(threads)
    try:
        r = optimize(backend, units, preset=get_preset(preset, steps=steps, **over), seed=seed, progress=False,
                     numerics=numerics)
    finally:
        torch.set_num_threads(2)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="default: the quick profile's")
    ap.add_argument("--threshold", type=float, default=DEFAULT_MIN_SSIM)
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TRAJECTORY_TOLERANCE)
    ap.add_argument("--median-tolerance", type=float, default=DEFAULT_MEDIAN_TOLERANCE)
    a = ap.parse_args()
    from omegaconf import OmegaConf
    from importlib import resources

    profile = OmegaConf.to_container(OmegaConf.create(
        resources.files("deepvis_repro_conf").joinpath("profile/quick.yaml").read_text()))
    steps = a.steps or profile["steps"]
    backend = dv.load_backend()
    units = [u for u, _ in profile_units(backend, profile)]
    print(f"{len(units)} units, {steps} steps, threshold {a.threshold}")
    twins, changes, tdiff = [], {}, {}
    base, base_h = {}, {}
    for s in profile["settings"]:
        runs = {"portable": run(backend, units, s, steps),
                "default, 1 thread": run(backend, units, s, steps, "default", 1),
                "default, 2 threads": run(backend, units, s, steps, "default", 2)}
        base[s], base_h[s] = runs["portable"].images, runs["portable"].history
        for (n1, r1), (n2, r2) in itertools.combinations(runs.items(), 2):
            for k in range(len(units)):
                i1, i2 = r1.images[k], r2.images[k]
                same = np.array_equal(i1, i2)
                twins.append((s, units[k], f"{n1} vs {n2}", 1.0 if same else ssim(i1, i2), same,
                              trajectory_difference(r1.history[:, k], r2.history[:, k])))
        print(f"  {s}: twins done", flush=True)
    planted = {
        "blur sigma 1.0 -> 0.7 (paper_3)": ("paper_3", {"blur_radius": 0.7}),
        "decay x10 (paper_3)": ("paper_3", {"decay": 0.001}),
        "small-contribution pct 90 -> 80 (paper_4)": ("paper_4", {"small_contrib_pct": 80}),
        "small-norm pct 50 -> 40 (paper_1)": ("paper_1", {"small_norm_pct": 40}),
        "learning rate x2 (paper_3)": ("paper_3", {"lr": 200.0}),
        "seed 0 -> 1 (paper_3)": ("paper_3", {"seed": 1}),
    }
    for name, (s, over) in planted.items():
        seed = over.pop("seed", 0)
        r = run(backend, units, s, steps, seed=seed, **over)
        changes[name] = [ssim(r.images[k], base[s][k]) for k in range(len(units))]
        tdiff[name] = [trajectory_difference(r.history[:, k], base_h[s][:, k]) for k in range(len(units))]
    changes["another unit (every setting)"] = [
        ssim(base[s][i], base[s][j]) for s in base for i in range(len(units)) for j in range(len(units)) if i != j]
    tdiff["another unit (every setting)"] = [
        trajectory_difference(base_h[s][:, i], base_h[s][:, j]) for s in base for i in range(len(units))
        for j in range(len(units)) if i != j]
    td = np.array([t[5] for t in twins])
    # per setting and pair of paths: the median over the units (the criterion's second level)
    medians = {}
    for t in twins:
        medians.setdefault((t[0], t[2]), []).append(t[5])
    worst_median = max(float(np.median(v)) for v in medians.values())
    print(f"\nTRAJECTORY criterion (first {TRAJECTORY_STEPS} objective values, relative difference):")
    print(f"  rounding twins: one image at most {td.max():.2e} (median {np.median(td):.1e}); a setting's median at "
          f"most {worst_median:.2e}; tolerances {a.tolerance:g} (image), {a.median_tolerance:g} (setting median)")
    for name, v in tdiff.items():
        v = np.array(v)
        caught = (v > a.tolerance).any() if name.startswith("another unit") else \
            (np.median(v) > a.median_tolerance or (v > a.tolerance).all())
        print(f"  {name:<42} image min {v.min():.2e}, median {np.median(v):.2e}: "
              f"{'caught' if caught else 'NOT caught'} ({int((v > a.tolerance).sum())}/{len(v)} images beyond "
              f"{a.tolerance:g})")
    print(f"  margins: image tolerance / twins' largest = {a.tolerance / max(td.max(), 1e-30):.1f}x; setting "
          f"tolerance / twins' largest median = {a.median_tolerance / max(worst_median, 1e-30):.1f}x")
    tw = np.array([t[3] for t in twins])
    print(f"\nSSIM: rounding twins: {len(tw)} pairs, {sum(t[4] for t in twins)} bit-identical; SSIM min {tw.min():.3f}, "
          f"5th pct {np.percentile(tw, 5):.3f}, median {np.median(tw):.3f}")
    for s in profile["settings"]:
        v = [t[3] for t in twins if t[0] == s]
        print(f"  {s:<8} min {min(v):.3f}  median {np.median(v):.3f}")
    worst = min(twins, key=lambda t: t[3])
    print(f"  lowest: {worst[0]} {worst[1]} ({worst[2]}) {worst[3]:.3f}")
    print("real changes (SSIM against the portable run):")
    top = 0.0
    for name, v in changes.items():
        v = np.array(v)
        top = max(top, v.max())
        print(f"  {name:<36} max {v.max():.3f}  median {np.median(v):.3f}  "
              f"fail at {a.threshold}: {int((v < a.threshold).sum())}/{len(v)}")
    print(f"  SSIM margins: twins' lowest {tw.min():.3f} - threshold {a.threshold} = {tw.min() - a.threshold:+.3f}; "
          f"threshold - changes' highest {top:.3f} = {a.threshold - top:+.3f} (SSIM alone cannot separate them)")


if __name__ == "__main__":
    main()
