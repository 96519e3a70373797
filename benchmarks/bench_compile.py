"""torch.compile on the optimizer's network work (issue 22 asked for it re-measured on this torch):
one step's forward to fc and backward to the image, on the embedded model's own module (BatchNorm
folded, channels-last), eager against torch.compile, at 1 and 8 images, float32.

    python benchmarks/bench_compile.py [--steps 20] [--device cuda]

Why the module and not the optimizer itself: the optimizer reads layers through forward hooks and
ends a pass early by an exception from a hook, which torch.compile cannot trace in one graph; this
measures the most compiling could give (the network is ~90% of a step: README "Speed").
"""
from __future__ import annotations

import argparse
import time

import torch

import deepvis_repro as dv
from deepvis_repro.allocator import keep_freed_memory
from bench_optimize import device_name


def step_fn(module):
    def step(x):
        x = x.detach().requires_grad_(True)
        out = module(x)
        obj = out[torch.arange(len(x)), torch.arange(len(x)) % out.shape[1]].sum()
        (g,) = torch.autograd.grad(obj, x)
        return g
    return step


def timed(fn, x, steps):
    fn(x)  # warm (and, compiled, the first call compiles: timed apart)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        for _ in range(steps):
            fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    keep_freed_memory()  # what every deepvis command does first (deepvis_repro/allocator.py)
    b = dv.load_backend().to(args.device)
    print(f"device {args.device} ({device_name(args.device)}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    eager = step_fn(b.module)
    compiled_module = torch.compile(b.module)
    compiled = step_fn(compiled_module)
    print(f"{'images':>6} {'eager ms/step':>14} {'compiled ms/step':>17} {'speedup':>8} {'compile s':>10}")
    for n in (1, 8):
        x = torch.randn(n, 3, 224, 224, device=args.device).contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        compiled(x)
        first = time.perf_counter() - t0
        e, c = timed(eager, x, args.steps), timed(compiled, x, args.steps)
        print(f"{n:>6} {1000 * e:>14.1f} {1000 * c:>17.1f} {e / c:>7.2f}x {first:>10.1f}")


if __name__ == "__main__":
    main()
