"""Optimizer throughput (unit-steps per second) on the embedded EfficientNet-Lite0 at 224 px,
side by side with Lucent's render_vis (PyPI torch-lucent) on the same model, same size, same
units, pixel parametrization and no transforms.

    pip install torch-lucent kornia kornia-rs --no-deps && python benchmarks/bench_optimize.py [--steps 30]

Both optimize fc units (the deepest layer, so neither can stop the forward pass early); Lucent
uses its own Adam on sigmoid pixels, deepvis-repro the paper's rule with paper_3's blur.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import deepvis_repro as dv
from deepvis_repro.optimize import optimize


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


def run_ours(backend, channels, steps, compile_=False):
    t = time.perf_counter()
    optimize(backend, [f"fc:{c}" for c in channels], preset="paper_3", steps=steps, progress=False)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    backend = dv.load_backend(device=args.device)
    # Lucent gets the model as a user loads it: the same architecture and checkpoint, standard
    # layout, BatchNorm as trained (deepvis-repro folds BN and uses channels_last: its own
    # engineering, part of what is measured). "lucent_same_module" gives Lucent our module too.
    plain = dv.load_backend(device=args.device, fuse_bn=False, channels_last=False)
    rows = []
    for n in (1, 8):
        channels = [130, 144, 302, 63, 100, 366, 1, 2][:n]
        run_ours(backend, channels, 3)  # warm up both (allocator, oneDNN primitives)
        ours = run_ours(backend, channels, args.steps)
        try:
            run_lucent(plain, channels, 3)
            lucent = run_lucent(plain, channels, args.steps)
            lucent_same = run_lucent(backend, channels, args.steps)
        except ImportError as e:  # no figures without the peer: say which package is missing
            raise SystemExit(f"bench_optimize: Lucent cannot be imported ({e.name or e}); install it with:\n"
                             "  pip install torch-lucent kornia kornia-rs --no-deps\n"
                             "(torch-lucent pins an old kornia; the benchmark needs neither its pins nor its other "
                             "dependencies)") from None
        row = {"units": n, "device": args.device, "steps": args.steps,
               "deepvis_unit_steps_per_s": n * args.steps / ours,
               "lucent_unit_steps_per_s": n * args.steps / lucent,
               "lucent_same_module_unit_steps_per_s": n * args.steps / lucent_same,
               "ms_per_image_step_deepvis": 1000 * ours / (n * args.steps)}
        row["speedup"] = row["deepvis_unit_steps_per_s"] / row["lucent_unit_steps_per_s"]
        rows.append(row)
        print(f"{n} unit(s), {args.device}: deepvis-repro {row['deepvis_unit_steps_per_s']:.1f} "
              f"unit-steps/s ({row['ms_per_image_step_deepvis']:.0f} ms per image-step), "
              f"Lucent {row['lucent_unit_steps_per_s']:.1f} unit-steps/s "
              f"({row['lucent_same_module_unit_steps_per_s']:.1f} on deepvis-repro's module), "
              f"speed-up {row['speedup']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
