"""What portable numerics cost: the optimizer's time per step in default and in portable
numerics, side by side (interleaved repeats, medians), on the embedded model, for the harness's
batch sizes, at every thread count up to the machine's.

    python benchmarks/bench_numerics.py [--steps 15] [--repeats 3] [--device cuda]

The first call of each shape verifies the library kernels against the spec (a few seconds, once
per process); it is timed separately and excluded from the per-step figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import deepvis_repro as dv
from deepvis_repro.optimize import optimize

UNITS = [f"fc:{c}" for c in (130, 144, 302, 63, 100, 366, 309, 947)] + ["blocks.9:10"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    backend = dv.load_backend(device=a.device)
    print(f"device {a.device}, torch {torch.__version__}, {os.cpu_count()} CPUs, preset paper_3")
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        for n in (1, 3, 9):
            units = UNITS[:n] if n < 9 else UNITS
            t = time.perf_counter()
            optimize(backend, units, preset="paper_3", steps=2, progress=False, numerics="portable")
            first = time.perf_counter() - t
            optimize(backend, units, preset="paper_3", steps=2, progress=False, numerics="default")
            times = {"default": [], "portable": []}
            for _ in range(a.repeats):
                for mode in times:
                    t = time.perf_counter()
                    optimize(backend, units, preset="paper_3", steps=a.steps, progress=False, numerics=mode)
                    times[mode].append((time.perf_counter() - t) / a.steps)
            d, p = statistics.median(times["default"]), statistics.median(times["portable"])
            print(f"{threads} thread(s), {n} unit(s): default {1000 * d:.0f} ms/step, portable {1000 * p:.0f} "
                  f"ms/step, ratio {p / d:.2f}x (first call with verification {first:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
