"""Issue 33, every unit's picture: the units of a layer that ends in a ReLU6 (the embedded
model's head, and pool, head's average) under the paper's objective and under
``optimize.pre_activation=true`` (optvis/preactivation.py), side by side in one run, as the
atlas runs them (batches of 8, the fast mode unless --exact).

    python benchmarks/bench_preactivation.py [--units 8] [--layers head,pool] [--exact]
                                             [--out docs/atlas_pre_activation.jpg]

Per layer: how many of its units have an exactly zero gradient at the start image (of all its
channels), each arm's time and steps, and for the units run, paired (Wilcoxon, bootstrap 95%
CI of the median difference: reproduce/stats.py): how far the picture moved from the start
image (RMS over pixels, 0..255) and the paper's own value (after the clamp) that the picture
reaches. --out: the pictures as the atlas crops them, the paper's objective above, before the
clamp below. The seconds per unit of the second arm, times a layer's channels, is what the
option adds to a whole atlas."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

import deepvis_repro as dv
from deepvis_repro.images import save_image
from deepvis_repro.optimize import optimize, start_images
from deepvis_repro.optvis.convergence import Convergence
from deepvis_repro.reproduce.stats import paired
from deepvis_repro.units import gather_units, layer_shapes, resolve_units

sys.path.insert(0, os.path.dirname(__file__))
from bench_atlas_fast import BATCH, dead_units, describe_paired, tile  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=8, help="units per layer, spread over its channels")
    ap.add_argument("--layers", default="head,pool")
    ap.add_argument("--exact", action="store_true", help="paper_3's full 1,000 steps, not the fast mode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    backend = dv.load_backend()
    converge = None if args.exact else Convergence()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}, {torch.get_num_threads()} threads; {'exact' if args.exact else 'fast'} mode, batches of {BATCH}")
    moved = {"paper": [], "pre": []}
    value = {"paper": [], "pre": []}
    rows = {"paper": [], "pre": []}
    for layer in args.layers.split(","):
        channels = layer_shapes(backend, [layer])[layer][0]
        specs = [f"{layer}:{c}" for c in np.linspace(0, channels - 1, args.units).round().astype(int)]
        units = resolve_units(backend, specs)
        start = start_images(backend, len(units), "mean_plus_rand", 0)
        print(f"{layer}: {dead_units(backend, layer)} of {channels} units have a zero gradient at the start image",
              flush=True)
        for arm, pre in (("paper", False), ("pre", True)):
            t = time.perf_counter()
            r = optimize(backend, specs, "paper_3", batch_size=BATCH, progress=False, converge=converge,
                         pre_activation=pre)
            dt = time.perf_counter() - t
            steps = [int(np.isfinite(r.history[:, i]).sum()) for i in range(len(units))]
            with torch.no_grad():  # the paper's value, the clamp on, in each picture
                v = gather_units(backend.forward(r.x, [layer]), units, backend).double().numpy()
            moved[arm] += list((r.x - start).flatten(1).pow(2).mean(1).sqrt().numpy())
            value[arm] += list(v)
            rows[arm] += [tile(backend, u, im) for u, im in zip(units, r.images)]
            print(f"  {arm:5s}: {dt:6.1f} s, {dt / len(units):5.1f} s per unit; steps mean {np.mean(steps):.0f} "
                  f"({min(steps)}-{max(steps)}); stopped early (zero gradient): {len(r.stopped)}; "
                  f"the paper's value mean {v.mean():.2f}", flush=True)
    for what, d in (("moved from the start image (RMS, 0..255)", moved), ("the paper's value (clamp on)", value)):
        p = paired("pre", d["pre"], "paper", d["paper"], what)
        print(f"{what}: paper mean {np.mean(d['paper']):.2f}, before the clamp {np.mean(d['pre']):.2f}; "
              + describe_paired(p, "before the clamp - paper"))
    if args.out:
        save_image(args.out, np.concatenate([np.concatenate(rows["paper"], 1), np.concatenate(rows["pre"], 1)], 0),
                   quality=90)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
