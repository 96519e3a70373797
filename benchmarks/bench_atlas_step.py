"""What one optimizer step of a batch of units costs as the batch grows: the ops it dispatches
(on a GPU each is a kernel launch, ~5-10 us of the CPU's time whatever the batch) and its time.

    python benchmarks/bench_atlas_step.py [--layers fc,head,blocks.10] [--units 8,64] [--device cuda]

The whole atlas on an H200 (2026-12-04, batches of 256) ran 124-137 ms per step at the deep
layers whatever the batch (64 units as slow as 256), against 6.5 ms for a plain forward and
backward of the model: not the arithmetic (the rest of the cause is not established; README, "On
a GPU"). Counted here on a CPU, the objective's
per-unit select chain and the per-unit argmax record added ~47 ops per conv unit and ~18 per fc
unit to every step (~12,000 at 256 units); both are now one op per layer. Each figure is the
difference between a run of --steps and one of --steps // 2 steps (what a step adds, without
the start-up), the atlas's way: fast mode off, before the clamp, --numerics.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import deepvis_repro as dv
from deepvis_repro.allocator import keep_freed_memory
from deepvis_repro.optimize import optimize

from bench_optimize import device_name


def run(backend, units, steps, numerics):
    return optimize(backend, units, steps=steps, progress=False, pre_activation=True, numerics=numerics)


def ops(backend, units, steps, numerics) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(backend, units, steps, numerics)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def seconds(backend, units, steps, numerics) -> float:
    t = time.perf_counter()
    run(backend, units, steps, numerics)  # returns images on the CPU: the device has finished
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="fc,head,blocks.10")
    ap.add_argument("--units", default="8,64", help="batch sizes (units of the layer, one batch)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--numerics", default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    keep_freed_memory()  # what every deepvis command does first (deepvis_repro/allocator.py)
    b = dv.load_backend(device=args.device)
    long, short = args.steps, args.steps // 2
    print(f"device {args.device} ({device_name(args.device)}), torch {torch.__version__}, numerics {args.numerics}; "
          f"per step: the difference of {long} and {short} steps")
    print(f"{'layer':>9} {'units':>5} {'ops/step':>9} {'ops/unit-step':>13} {'ms/step':>8} {'ms/unit-step':>12}")
    for layer in args.layers.split(","):
        for n in (int(u) for u in args.units.split(",")):
            units = [f"{layer}:{c}" for c in range(n)]
            run(b, units, 2, args.numerics)  # warm: allocator, kernels' first calls
            per_op = (ops(b, units, long, args.numerics) - ops(b, units, short, args.numerics)) / (long - short)
            sec = min((seconds(b, units, long, args.numerics) - seconds(b, units, short, args.numerics))
                      / (long - short) for _ in range(2))
            print(f"{layer:>9} {n:>5} {per_op:>9.0f} {per_op / n:>13.1f} {sec * 1e3:>8.1f} {sec * 1e3 / n:>12.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
