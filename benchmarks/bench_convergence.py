"""Issue 33, the fast mode's stop criterion: what a looser or tighter one would save and cost,
from full runs. A unit's fast run is its exact run cut at the step where the criterion stops it
(tests/test_atlas_fast.py: the fast image is the exact run's best image of those steps), so one
exact run per unit answers for every criterion:

    python benchmarks/bench_convergence.py [--units 8] [--save runs.npz | --load runs.npz]

Per representative layer (blocks.4, blocks.10, blocks.15, head, pool, fc; as bench_atlas_bf16.py
groups the others under them), --units units spread over its channels run paper_3's 1,000 steps
in batches of 8, ``pre_activation``, bf16 where the CPU has it. Then, per criterion of a grid
around the default (optvis/convergence.py: window 50, rel_tol 2%, from step 150, every 25): the
steps each unit would run, the value its picture would reach against its 1,000-step value (paired
over every unit: Wilcoxon, bootstrap 95% interval), the judge's rank of fc's class in the picture
at the stop (EfficientNet-Lite1, the harness's judge), and the complete atlas projected: each
group's units at its representative's mean steps and its measured seconds per unit-step."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

import deepvis_repro as dv
from deepvis_repro.allocator import keep_freed_memory
from deepvis_repro.bf16 import runs_bf16
from deepvis_repro.optimize import optimize
from deepvis_repro.optvis.convergence import Convergence
from deepvis_repro.reproduce.metrics import class_ranks
from deepvis_repro.reproduce.stats import paired
from deepvis_repro.images import save_image
from deepvis_repro.units import layer_shapes, resolve_units

sys.path.insert(0, os.path.dirname(__file__))
from bench_atlas_fast import BATCH, describe_paired, tile  # noqa: E402
from bench_atlas_bf16 import GROUPS  # noqa: E402

EVERY = 25  # every criterion below checks on this grid: the fc pictures are kept at each of its steps

#: (window, rel_tol, min_steps): the default first
CRITERIA = [(50, 0.02, 150), (50, 0.02, 100), (50, 0.03, 150), (50, 0.03, 100), (50, 0.05, 100),
            (25, 0.01, 100), (25, 0.02, 100), (100, 0.05, 150), (50, 0.01, 150)]


def exact_runs(backend, n_units: int, numerics: str, steps: int = 1000) -> dict:
    """Each representative layer's units, ``steps`` steps: their histories, seconds per unit-step,
    and (fc) the deprocessed best picture at every EVERY-th step."""
    out = {}
    for rep in GROUPS:
        channels = layer_shapes(backend, [rep])[rep][0]
        chans = np.linspace(0, channels - 1, min(n_units, channels)).round().astype(int)
        units = [f"{rep}:{c}" for c in chans]
        snaps = {}

        def keep(step, best_x, best, snaps=snaps):
            if (step + 1) % EVERY == 0:  # uint8, as the atlas keeps it
                snaps.setdefault(step, []).append(backend.deprocess(best_x).reshape(len(best_x), *backend.input_size, 3))

        t = time.perf_counter()
        r = optimize(backend, units, "paper_3", steps=steps, progress=False, batch_size=BATCH, pre_activation=True,
                     numerics=numerics, on_best=keep if rep == "fc" else None)
        took = time.perf_counter() - t
        out[f"{rep}/history"] = r.history
        out[f"{rep}/channels"] = chans
        out[f"{rep}/s_per_unit_step"] = np.array(took / (len(units) * steps))
        if rep == "fc":
            out["fc/snap_steps"] = np.array(sorted(snaps))
            out["fc/snaps"] = np.stack([np.concatenate(snaps[s]) for s in sorted(snaps)])
        print(f"  {rep}: {len(units)} units, {took:.0f} s, {1000 * took / (len(units) * steps):.2f} ms per unit-step",
              flush=True)
    return out


def stop_steps(history: np.ndarray, c: Convergence) -> np.ndarray:
    """The step index each unit stops at under c (the last step if never), as optimize decides:
    after step ii, when due(ii + 1) and ii >= window, on the best-so-far trace."""
    best = np.fmax.accumulate(np.nan_to_num(history, nan=-np.inf), axis=0)
    stop = np.full(history.shape[1], len(history) - 1)
    for i in range(history.shape[1]):
        for ii in range(len(history)):
            if c.due(ii + 1) and ii >= c.window:
                now, then = best[ii, i], best[ii - c.window, i]
                if np.isfinite(now) and np.isfinite(then) and now - then < c.rel_tol * abs(now):
                    stop[i] = ii
                    break
    return stop


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1000, help="paper_3's 1,000; fewer only to try the script")
    ap.add_argument("--save", help="keep the full runs here (npz)")
    ap.add_argument("--load", help="the full runs from an earlier --save, instead of running them")
    ap.add_argument("--out", help="a picture of fc's units: at the full length (above), at the default's stop, "
                                  "and at --looser's (below)")
    ap.add_argument("--looser", default="50,0.05,100", metavar="WINDOW,REL_TOL,MIN_STEPS")
    args = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    b = dv.load_backend(device="cpu")
    if args.load:
        runs = dict(np.load(args.load))
    else:
        numerics = "bf16" if runs_bf16("cpu") else "default"
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; paper_3 {args.steps} steps, pre_activation, "
              f"{numerics}, batches of {BATCH}, {args.units} units per layer", flush=True)
        runs = exact_runs(b, args.units, numerics, args.steps)
        if args.save:
            np.savez_compressed(args.save, **runs)
    judge = dv.load_backend("efficientnet_lite1")  # the harness's judge (conf/reproduce.yaml)
    classes = [int(c) for c in runs["fc/channels"]]
    snap_at = {int(s): k for k, s in enumerate(runs["fc/snap_steps"])}
    final = {}
    for rep in GROUPS:
        h = runs[f"{rep}/history"]
        final[rep] = np.fmax.accumulate(np.nan_to_num(h, nan=-np.inf), axis=0)
    steps = len(runs["fc/history"])
    rank_full = class_ranks(judge, runs["fc/snaps"][snap_at[steps - 1]], classes)
    print(f"fc's classes at {steps} steps, the judge's rank: median {np.median(rank_full):.0f} "
          f"(each {', '.join(str(r) for r in rank_full)})", flush=True)
    print(f"{'window':>6} {'rel_tol':>7} {'from':>5} | mean steps per layer ({', '.join(GROUPS)}) | "
          f"atlas h | value / full run's value: median (min) | fc rank median (max)", flush=True)
    default_at_stop = None
    for window, rel_tol, min_steps in CRITERIA:
        c = Convergence(window=window, rel_tol=rel_tol, min_steps=min_steps, every=EVERY)
        hours, means, at_stop, at_end = 0.0, [], [], []
        for rep, members in GROUPS.items():
            stop = stop_steps(runs[f"{rep}/history"], c)
            means.append((stop + 1).mean())
            count = sum(layer_shapes(b, [m])[m][0] for m in members)
            hours += count * (stop + 1).mean() * float(runs[f"{rep}/s_per_unit_step"]) / 3600
            cols = np.arange(len(stop))
            at_stop += list(final[rep][stop, cols])
            at_end += list(final[rep][-1, cols])
            if rep == "fc":
                pics = np.stack([runs["fc/snaps"][snap_at[int(s)], i] for i, s in enumerate(stop)])
                ranks = class_ranks(judge, pics, classes)
        at_stop, at_end = np.array(at_stop), np.array(at_end)
        ratio = at_stop / at_end
        p = paired("stop", list(at_stop), "full", list(at_end), "act")
        print(f"{window:>6} {rel_tol:>7.2f} {min_steps:>5} | {' '.join(f'{m:.0f}' for m in means)} | {hours:.2f} | "
              f"{np.median(ratio):.3f} ({ratio.min():.3f}) | {np.median(ranks):.0f} ({max(ranks)})"
              + (" <- the default" if c == Convergence() else ""), flush=True)
        print(f"{'':>21}value at the stop - at {steps} steps, " + describe_paired(p), flush=True)
        if default_at_stop is None:  # CRITERIA[0], the default
            default_at_stop = at_stop
        else:
            q = paired("this", list(at_stop), "default", list(default_at_stop), "act")
            print(f"{'':>21}value at this stop - at the default's, " + (describe_paired(q) if q else "the same"),
                  flush=True)


    if args.out:
        window, rel_tol, min_steps = args.looser.split(",")
        looser = Convergence(window=int(window), rel_tol=float(rel_tol), min_steps=int(min_steps), every=EVERY)
        h, units = runs["fc/history"], resolve_units(b, [f"fc:{c}" for c in classes])
        rows = [np.full(len(units), steps - 1), stop_steps(h, Convergence()), stop_steps(h, looser)]
        grid = [np.concatenate([tile(b, u, runs["fc/snaps"][snap_at[int(at[i])], i]) for i, u in enumerate(units)], 1)
                for at in rows]
        save_image(args.out, np.concatenate(grid, 0), quality=90)
        print(f"wrote {args.out}: fc's {len(units)} classes at {steps} steps, at the default's stop, at {looser.describe()}'s")


if __name__ == "__main__":
    main()
