"""A ViT-Tiny in the toolbox (issue 32): the live view's network passes per second (back mode off
and gradient) and the optimizer's unit-steps per second against Lucent's render_vis on the same
module, side by side in one run. timm's vit_tiny_patch16_224 at full depth (12 blocks, 5.7 M
parameters, 224 px) with random weights (no hub here; speed does not depend on the weights).

    pip install torch-lucent kornia kornia-rs decorator --no-deps && python benchmarks/bench_vit.py [--seconds 10]
    python benchmarks/bench_vit.py --device cuda

Live: headless (SDL dummy driver), a video source so every pass has a new frame, layer blocks.6.
Optimizer: the head's class units (the deepest layer: neither side can stop the forward pass
early), pixels and no transforms on Lucent's side (its Adam on sigmoid pixels), paper_3 on ours;
1 and 8 units; each figure the faster of --repeats interleaved runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import torch
from torch import nn

import deepvis_repro as dv
from deepvis_repro.allocator import keep_freed_memory
from deepvis_repro.live.app import LiveApp
from deepvis_repro.live.sources import VideoSource
from deepvis_repro.optimize import optimize

sys.path.insert(0, os.path.dirname(__file__))
from bench_live import make_video  # noqa: E402
from bench_optimize import device_name  # noqa: E402


class Normalized(nn.Module):
    """The timm model as Lucent sees it: RGB in 0..1 -> the model's own normalized input."""

    def __init__(self, backend):
        super().__init__()
        self.net = backend.module
        cfg = backend.module.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1))

    def forward(self, img):
        return self.net((img - self.mean) / self.std)


def run_lucent(model, channels, steps, size):
    from lucent.optvis import objectives, param, render

    obj = sum((objectives.channel("net_head", c, batch=i) for i, c in enumerate(channels)),
              start=objectives.Objective(lambda T: 0))
    param_f = lambda: param.image(size, batch=len(channels), fft=False, decorrelate=False)  # noqa: E731
    t = time.perf_counter()
    render.render_vis(model, obj, param_f, transforms=[], thresholds=(steps,), preprocess=False,
                      progress=False, show_image=False, fixed_image_size=size)
    return time.perf_counter() - t


def run_ours(backend, channels, steps):
    t = time.perf_counter()
    optimize(backend, [f"head:{c}" for c in channels], preset="paper_3", steps=steps, progress=False)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    backend = dv.load_backend("timm", model="vit_tiny_patch16_224", device=args.device)
    print(f"device: {args.device}, {device_name(args.device)}; torch {torch.__version__}; "
          f"timm vit_tiny_patch16_224 (random weights)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        video = os.path.join(tmp, "pan.mp4")
        make_video(video)
        for keys, mode in (([], "off"), (["b"], "gradient")):
            app = LiveApp(backend, VideoSource(video), max_frames=int(args.seconds * 30), keys=keys, layer="blocks.6")
            s = app.run()
            print(f"live, back {mode:<8} layer blocks.6: network {s['net_fps']:.1f} passes/s "
                  f"({s['net_ms_per_pass']:.0f} ms per pass), display {s['display_fps']:.1f} fps", flush=True)
    try:
        importlib.import_module("lucent.optvis.objectives")  # what the runs import (decorator too)
    except ImportError as e:
        raise SystemExit(f"bench_vit: Lucent cannot be imported ({e.name or e}); "
                         "pip install torch-lucent kornia kornia-rs decorator --no-deps") from None
    model = Normalized(backend).to(args.device).eval().requires_grad_(False)
    size = backend.input_size[0]
    for n in (1, 8):
        channels = [130, 144, 302, 63, 100, 366, 1, 2][:n]
        run_ours(backend, channels, 2), run_lucent(model, channels, 2, size)  # warm up
        ours = lucent_t = float("inf")
        for _ in range(args.repeats):
            ours = min(ours, run_ours(backend, channels, args.steps))
            lucent_t = min(lucent_t, run_lucent(model, channels, args.steps, size))
        a, b = n * args.steps / ours, n * args.steps / lucent_t
        print(f"optimizer, {n} unit(s), unit-steps/s: deepvis-repro {a:.1f}, Lucent on the same module {b:.1f} "
              f"({a / b:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
