"""Optimizer throughput (unit-steps per second) on the embedded EfficientNet-Lite0 at 224 px,
side by side in one run with Lucent's render_vis (PyPI torch-lucent): same size, same units,
pixel parametrization and no transforms, at 1 and 8 units, in float32 and bfloat16.

    pip install torch-lucent kornia kornia-rs decorator --no-deps && python benchmarks/bench_optimize.py [--steps 30]
    python benchmarks/bench_optimize.py --device cuda      # on a GPU

Columns: deepvis-repro in float32 (numerics=default) and bf16 (numerics=bf16); Lucent given the
model as a user loads it (BatchNorm as trained, standard layout), and given deepvis-repro's own
module (the strict comparison: the same per-step network work), in float32 and under
torch.autocast(bfloat16). Both optimize fc units (the deepest layer, so neither can stop the
forward pass early); Lucent uses its own Adam on sigmoid pixels, deepvis-repro the paper's rule
with paper_3's blur. Each figure is the faster of --repeats runs (the machine's other work only
ever slows a run down).
"""
from __future__ import annotations

import argparse
import importlib
import json
import time

import torch
from torch import nn

import deepvis_repro as dv
from deepvis_repro.allocator import keep_freed_memory
from deepvis_repro.optimize import optimize
from deepvis_repro.outputs import machine


class Normalized(nn.Module):
    """The embedded model as Lucent sees it: RGB in 0..1 -> the backend's own input."""

    def __init__(self, backend):
        super().__init__()
        self.net = backend.module

    def forward(self, img):
        return self.net((img * 255.0 - 127.5) / 128.0)


def run_lucent(backend, channels, steps):
    from lucent.optvis import objectives, param, render

    model = Normalized(backend).eval().requires_grad_(False)
    obj = sum((objectives.channel("net__fc", c, batch=i) for i, c in enumerate(channels)),
              start=objectives.Objective(lambda T: 0))
    param_f = lambda: param.image(224, batch=len(channels), fft=False, decorrelate=False)
    t = time.perf_counter()
    render.render_vis(model, obj, param_f, transforms=[], thresholds=(steps,), preprocess=False,
                      progress=False, show_image=False, fixed_image_size=224)
    return time.perf_counter() - t


def run_ours(backend, channels, steps, numerics="default"):
    t = time.perf_counter()
    optimize(backend, [f"fc:{c}" for c in channels], preset="paper_3", steps=steps, progress=False,
             numerics=numerics)
    return time.perf_counter() - t


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    m = machine()
    return f"{m['cpu']} ({m['isa']}, {m['torch_threads']} threads)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    keep_freed_memory()  # what every deepvis command does first (deepvis_repro/allocator.py)
    print(f"device: {args.device}, {device_name(args.device)}; torch {torch.__version__}", flush=True)
    backend = dv.load_backend(device=args.device)
    plain = dv.load_backend(device=args.device, fuse_bn=False, channels_last=False)
    dev = torch.device(args.device).type
    try:
        importlib.import_module("lucent.optvis.objectives")  # what the runs import (decorator too)
    except ImportError as e:  # no figures without the peer: say which package is missing
        raise SystemExit(f"bench_optimize: Lucent cannot be imported ({e.name or e}); install it with:\n"
                         "  pip install torch-lucent kornia kornia-rs decorator --no-deps\n"
                         "(torch-lucent pins an old kornia; the benchmark needs neither its pins nor its other "
                         "dependencies)") from None

    def lucent_bf16(b, channels, steps):
        with torch.autocast(dev, dtype=torch.bfloat16):
            return run_lucent(b, channels, steps)

    runs = {"deepvis_fp32": lambda c, s: run_ours(backend, c, s),
            "deepvis_bf16": lambda c, s: run_ours(backend, c, s, "bf16"),
            "lucent_as_loaded_fp32": lambda c, s: run_lucent(plain, c, s),
            "lucent_same_module_fp32": lambda c, s: run_lucent(backend, c, s),
            "lucent_same_module_bf16": lambda c, s: lucent_bf16(backend, c, s)}
    rows = []
    for n in (1, 8):
        channels = [130, 144, 302, 63, 100, 366, 1, 2][:n]
        for run in runs.values():
            run(channels, 3)  # warm up each (allocator, oneDNN primitives)
        best = {k: float("inf") for k in runs}
        for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every column
            for k, run in runs.items():
                best[k] = min(best[k], run(channels, args.steps))
        row = {"units": n, "device": args.device, "steps": args.steps,
               **{k: n * args.steps / v for k, v in best.items()}}
        row["fp32_vs_lucent_same_module"] = row["deepvis_fp32"] / row["lucent_same_module_fp32"]
        row["bf16_vs_fp32"] = row["deepvis_bf16"] / row["deepvis_fp32"]
        row["bf16_vs_lucent_same_module_bf16"] = row["deepvis_bf16"] / row["lucent_same_module_bf16"]
        rows.append(row)
        print(f"{n} unit(s), unit-steps/s: deepvis-repro fp32 {row['deepvis_fp32']:.1f}, bf16 {row['deepvis_bf16']:.1f} "
              f"({row['bf16_vs_fp32']:.2f}x); Lucent as loaded {row['lucent_as_loaded_fp32']:.1f}, on our module "
              f"fp32 {row['lucent_same_module_fp32']:.1f}, bf16 autocast {row['lucent_same_module_bf16']:.1f}; "
              f"ours vs Lucent on the same module: fp32 {row['fp32_vs_lucent_same_module']:.2f}x, "
              f"bf16 {row['bf16_vs_lucent_same_module_bf16']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
