"""Issue 33, the fast atlas's rows refilled: a unit that converges leaves its row to the next unit
of the layer (optimize._drive), where fixed batches of 8 ran each batch to its slowest unit with
the other rows idle. Side by side in one run, fast mode, ``pre_activation``, bf16 (where the CPU
has it, else float32), the atlas's width of 8 rows:

    python benchmarks/bench_atlas_refill.py [--layers blocks.15,head,pool,fc] [--units 16] [--rounds 2]
    python benchmarks/bench_atlas_refill.py --project [--criterion 50,0.05,100]

Per layer, the same units (spread over its channels) run by both arms, interleaved, their order
alternating by round: "fixed" (batches of 8, as before this release) and "refill". Prints
seconds per unit, steps run, the speed-up, and each unit's activation paired (a unit's run is its
own in any batch: the same bits where batched arithmetic rounds alike)."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

import deepvis_repro as dv
from deepvis_repro.bf16 import runs_bf16
from deepvis_repro.allocator import keep_freed_memory
from deepvis_repro.optimize import optimize
from deepvis_repro.optvis.convergence import Convergence
from deepvis_repro.reproduce.stats import paired
from deepvis_repro.units import layer_shapes

sys.path.insert(0, os.path.dirname(__file__))
from bench_atlas_fast import BATCH, describe_paired  # noqa: E402
from bench_atlas_bf16 import GROUPS  # noqa: E402


CRITERION = Convergence()  # --criterion: another (bench_convergence.py says what each saves and costs)


def run(backend, units, arm):
    """(seconds, best activations, steps run per unit) of one arm on these units."""
    kw = dict(progress=False, pre_activation=True, numerics="bf16", converge=CRITERION)
    t = time.perf_counter()
    if arm == "refill":
        parts = [optimize(backend, units, batch_size=BATCH, **kw)]
    else:  # fixed batches of 8, each run to its slowest unit
        parts = [optimize(backend, units[i:i + BATCH], **kw) for i in range(0, len(units), BATCH)]
    took = time.perf_counter() - t
    acts = np.concatenate([r.best_activation for r in parts])
    steps = np.concatenate([np.isfinite(r.history).sum(0) for r in parts])
    return took, acts, steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="blocks.15,head,pool,fc")
    ap.add_argument("--units", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--project", action="store_true",
                    help="instead: the refilled arm alone on each representative layer (blocks.4, blocks.10, "
                         "blocks.15, head, pool, fc), and the complete atlas projected from it")
    ap.add_argument("--criterion", metavar="WINDOW,REL_TOL,MIN_STEPS",
                    help="the fast mode's stop (optimize.convergence.*; every 25 steps); default 50,0.02,150")
    args = ap.parse_args()
    if args.criterion:
        global CRITERION
        window, rel_tol, min_steps = args.criterion.split(",")
        CRITERION = Convergence(window=int(window), rel_tol=float(rel_tol), min_steps=int(min_steps))
    keep_freed_memory()
    torch.manual_seed(0)
    b = dv.load_backend(device="cpu")
    numerics = "bf16" if runs_bf16("cpu") else "float32 (no native bf16 here)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fast mode, pre_activation, {numerics}, "
          f"width {BATCH}; {args.units} units per layer; criterion {CRITERION.describe()}" + ("" if args.project else
                                                           f", {args.rounds} rounds, arms interleaved"), flush=True)
    if args.project:
        return project(b, args.units)
    arms = ["fixed", "refill"]
    for layer in args.layers.split(","):
        channels = layer_shapes(b, [layer])[layer][0]
        n = min(args.units, channels)
        units = [f"{layer}:{c}" for c in np.linspace(0, channels - 1, n).round().astype(int)]
        times = {a: [] for a in arms}
        acts = {}
        for r in range(args.rounds):
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                took, a, steps = run(b, units, arm)
                times[arm].append(took / n)
                acts.setdefault(arm, a)
                print(f"  {layer} round {r + 1} {arm}: {took / n:.2f} s/unit, steps {steps.mean():.0f} "
                      f"({steps.min()}-{steps.max()})", flush=True)
        before = float(np.mean(times["fixed"]))
        line = ", ".join(f"{a} {np.mean(times[a]):.2f} s/unit ({before / np.mean(times[a]):.2f}x)" for a in arms)
        print(f"{layer} ({n} units): {line}", flush=True)
        p = paired("refill", list(acts["refill"]), "fixed", list(acts["fixed"]), "act")
        same = sum(float(x) == float(y) for x, y in zip(acts["refill"], acts["fixed"]))
        print("  activation, refill - fixed: " + (describe_paired(p) if p else "no pairs")
              + f"; {same} of {n} the same to the bit", flush=True)


def project(backend, n_units: int) -> None:
    """The complete fast bf16 atlas (every layer, every unit's picture) projected from each
    representative layer's seconds per unit: its group's units at its cost (GROUPS, as
    bench_atlas_bf16.py projects)."""
    total = 0.0
    for rep, members in GROUPS.items():
        channels = layer_shapes(backend, [rep])[rep][0]
        units = [f"{rep}:{c}" for c in np.linspace(0, channels - 1, min(n_units, channels)).round().astype(int)]
        took, _, steps = run(backend, units, "refill")
        per_unit = took / len(units)
        count = sum(layer_shapes(backend, [m])[m][0] for m in members)
        total += count * per_unit
        print(f"  {rep} ({len(units)} units): {per_unit:.2f} s/unit, steps {steps.mean():.0f} "
              f"({steps.min()}-{steps.max()}); its group {', '.join(members)}: {count} units, "
              f"{count * per_unit / 3600:.2f} h", flush=True)
    print(f"the complete atlas, fast + bf16, refilled rows: {total / 3600:.1f} h projected", flush=True)


if __name__ == "__main__":
    main()
