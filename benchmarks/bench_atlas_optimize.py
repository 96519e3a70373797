"""Issue 33, step 1: what `deepvis-optimize 'units=[LAYER:all]' atlas.dir=A` costs for every layer
of the embedded model (paper_3, its 1,000 steps), the baseline the fast mode is measured against.

    python benchmarks/bench_atlas_optimize.py [--units 8] [--short 10] [--long 40]

A full run of every unit is ~44 hours here, so each layer is measured, not run out: the command
itself (in a fresh process, as a user runs it) on the layer's first ``--units`` units as one batch,
once with ``--short`` and once with ``--long`` steps; the difference is the time of the extra steps
(the process's start, the model's load and the lr calibration cancel out), projected to the
setting's steps and the layer's channels in batches of that size. Peak memory: the process's
maximum resident set (the long run). Prints one line per layer and the projected total.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time


def run(args, env):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{' '.join(args)} failed: {r.stderr.strip().splitlines()[-1:]}")
    return dt, max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--short", type=int, default=10)
    ap.add_argument("--long", type=int, default=40)
    ap.add_argument("--layers", default=None, help="comma-separated; default every layer but prob")
    args = ap.parse_args()
    import deepvis_repro as dv
    from deepvis_repro.optimize import get_preset
    from deepvis_repro.units import layer_shapes

    backend = dv.load_backend()
    layers = args.layers.split(",") if args.layers else [l for l in backend.layers if l != "prob"]
    steps = get_preset("paper_3").steps
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores; paper_3 ({steps} steps), batches of {args.units} units; "
          f"{args.short} and {args.long} steps measured per layer", flush=True)
    env = dict(os.environ)
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for layer in layers:
            channels = layer_shapes(backend, [layer])[layer][0]
            n = min(args.units, channels)
            units = "[" + ",".join(f"{layer}:{c}" for c in range(n)) + "]"
            times = []
            for s in (args.short, args.long):
                a = os.path.join(tmp, f"{layer}_{s}")
                dt, peak = run(["deepvis-optimize", f"units={units}", f"optimize.steps={s}",
                                f"optimize.batch_size={n}", f"atlas.dir={a}", f"hydra.run.dir={tmp}/run"], env)
                times.append(dt)
            per_step = max(times[1] - times[0], 0.0) / (args.long - args.short)  # one batch of n units
            layer_s = per_step * steps * -(-channels // n)
            total += layer_s
            print(f"{layer:<10} {channels:5d} units: {per_step * 1000:7.1f} ms per step of {n} units -> "
                  f"{layer_s / 3600:6.2f} h for the layer; peak {peak:.2f} GB", flush=True)
    print(f"every layer: {total / 3600:.1f} h projected (paper_3, exact mode)")


if __name__ == "__main__":
    main()
