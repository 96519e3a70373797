"""Our `lucid` preset checked against an independent implementation: Lucent 0.1.8's render_vis
(PyPI torch-lucent) with the same parametrization (decorrelated Fourier image), its standard
transforms and its Adam at 0.05, on the same module (the embedded EfficientNet-Lite0) and the same
class units, for the same number of steps. Both sets of images are judged by the harness's judge
(EfficientNet-Lite1): each method's median judge rank with its bootstrap interval over units, the
paired Wilcoxon test between them, the units' activations, and the speed of each, side by side in
one run.

    pip install torch-lucent kornia kornia-rs decorator --no-deps && python benchmarks/compare_lucent.py [--steps 512]

What differs by design: Lucent's colour matrix is ImageNet's, ours is measured on scikit-image's
photos (deepvis_repro/optvis/natural.py); Lucent draws its transforms from numpy's global state and
the model sees the padded, rescaled image at its new size, ours draws from a seeded RandomState and
resamples each transformed copy back to 224 px; Lucent returns the last step's image, as we do.
"""
from __future__ import annotations

import argparse
import importlib
import json
import time

import numpy as np
import torch

import deepvis_repro as dv
from deepvis_repro.optimize import optimize
from deepvis_repro.reproduce.metrics import class_ranks
from deepvis_repro.reproduce.stats import bootstrap_ci, fmt_interval, fmt_p, paired

from bench_optimize import Normalized  # the embedded model as Lucent sees it (RGB 0..1), this folder

CLASSES = [130, 144, 302, 63, 100, 366, 309, 947]  # the paper's six and two more (profile=quick's)


def _kornia_names():
    """Lucent 0.1.8 calls kornia.get_rotation_matrix2d / kornia.warp_affine, top-level names that
    kornia >= 0.7 keeps only in kornia.geometry.transform: point the old names at them."""
    import kornia
    from kornia.geometry import transform as kt

    for name in ("get_rotation_matrix2d", "warp_affine"):
        if not hasattr(kornia, name):
            setattr(kornia, name, getattr(kt, name))


def run_lucent(backend, classes, steps, seed):
    from lucent.optvis import objectives, param, render, transform

    _kornia_names()

    np.random.seed(seed)
    torch.manual_seed(seed)
    model = Normalized(backend).eval().requires_grad_(False)
    obj = sum((objectives.channel("net__fc", c, batch=i) for i, c in enumerate(classes)),
              start=objectives.Objective(lambda T: 0))
    param_f = lambda: param.image(224, batch=len(classes), fft=True, decorrelate=True)
    t = time.perf_counter()
    images = render.render_vis(model, obj, param_f, transforms=transform.standard_transforms, thresholds=(steps,),
                               preprocess=False, progress=False, show_image=False, fixed_image_size=224)[-1]
    return time.perf_counter() - t, np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def run_ours(backend, classes, steps, seed):
    t = time.perf_counter()
    r = optimize(backend, [f"fc:{c}" for c in classes], preset="lucid", steps=steps, seed=seed, progress=False)
    return time.perf_counter() - t, r.images


def activations(backend, images, classes):
    x = torch.cat([backend.preprocess(im) for im in images])
    with torch.no_grad():
        fc = backend.forward(x, ["fc"])["fc"]
    return [float(fc[i, c]) for i, c in enumerate(classes)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the two rows of images and the figures (json) here")
    args = ap.parse_args()
    try:
        importlib.import_module("lucent.optvis.objectives")  # what the runs import (decorator too)
    except ImportError as e:
        raise SystemExit(f"compare_lucent: Lucent cannot be imported ({e.name or e}); install it with:\n"
                         "  pip install torch-lucent kornia kornia-rs decorator --no-deps") from None
    backend = dv.load_backend(device=args.device)
    judge = dv.load_backend("efficientnet_lite1", device=args.device)
    run_ours(backend, CLASSES[:2], 3, args.seed)  # warm up both (allocator, oneDNN primitives)
    run_lucent(backend, CLASSES[:2], 3, args.seed)
    results = {}
    for name, run in (("deepvis-repro lucid", run_ours), ("Lucent render_vis", run_lucent)):
        seconds, images = run(backend, CLASSES, args.steps, args.seed)
        results[name] = {"seconds": seconds, "unit_steps_per_s": len(CLASSES) * args.steps / seconds,
                         "judge_rank": class_ranks(judge, images, CLASSES),
                         "activation": activations(backend, images, CLASSES), "images": images}
    print(f"{len(CLASSES)} class units of the embedded EfficientNet-Lite0, {args.steps} steps, {args.device}; "
          "judge EfficientNet-Lite1 (rank 1 = its top class)")
    for name, r in results.items():
        ci = bootstrap_ci(r["judge_rank"], np.median, seed=args.seed).as_dict()
        act = bootstrap_ci(r["activation"], np.mean, seed=args.seed).as_dict()
        r["judge_rank_median"], r["activation_mean"] = ci, act
        print(f"  {name:20s} judge rank median {fmt_interval(ci, 0):16s} top-5 {sum(v <= 5 for v in r['judge_rank'])}/"
              f"{len(CLASSES)}  activation {fmt_interval(act):22s} {r['unit_steps_per_s']:.1f} unit-steps/s"
              f"  ranks {r['judge_rank']}")
    (a, ra), (b, rb) = results.items()
    p = paired(a, ra["judge_rank"], b, rb["judge_rank"], "judge_rank", args.seed)
    speed = ra["unit_steps_per_s"] / rb["unit_steps_per_s"]
    d = {"estimate": p.median_difference, "low": p.low, "high": p.high, "n": p.n}
    print(f"  paired (judge rank, {a} - {b}): median difference {fmt_interval(d, 0)}"
          f", Wilcoxon p = {fmt_p(p.p_value)}; speed {speed:.2f}x Lucent's")
    if args.out:
        from pathlib import Path

        from deepvis_repro.images import figure_grid, save_png

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_png(out / "lucid_vs_lucent.png", figure_grid([list(r["images"]) for r in results.values()],
                                                          row_labels=list(results), col_labels=[f"fc:{c}" for c in CLASSES],
                                                          tile=128))
        rows = {k: {kk: vv for kk, vv in v.items() if kk != "images"} for k, v in results.items()}
        with open(out / "lucid_vs_lucent.json", "w") as f:
            json.dump({"steps": args.steps, "device": args.device, "results": rows, "paired": p.as_dict(),
                       "speed_ratio": speed}, f, indent=1)


if __name__ == "__main__":
    main()
