"""Issue 33, the complete atlas's cost: the fast mode with every unit's picture
(``optimize.fast=true optimize.pre_activation=true``) in float32 and in bfloat16
(``optimize.numerics=bf16``), side by side in one run, as the atlas runs them (batches of 8).

    python benchmarks/bench_atlas_bf16.py [--units 8] [--layers blocks.4,blocks.10,blocks.15,head,pool,fc]
                                          [--exact-steps 20] [--out docs/atlas_bf16_vs_float32.jpg]

1. The exact mode's cost on this machine, every layer: milliseconds per step of 8 units in
   float32 (``--exact-steps`` steps minus 3 of a fresh call, so the start-up cancels), times
   1,000 steps and the layer's channels: the baseline the fast modes are measured against.
2. Per representative layer, the same units (spread over its channels) in the fast mode in
   float32 and in bf16, the two arms interleaved (which goes first alternates by layer): seconds
   per unit, steps run, and the speed-up.
3. What bf16 does to the pictures, paired over the same units (Wilcoxon, bootstrap 95% CI of the
   median difference: reproduce/stats.py): the value each picture reaches, measured in float32
   for both arms (before the clamp where the option took it off); the judge's rank of fc's class
   (EfficientNet-Lite1, the harness's judge); SSIM of the pictures as the atlas crops them.
4. The complete atlas projected: each layer's exact hours divided by its group's speed-up
   (stem..blocks.7 at blocks.4's, blocks.8-12 at blocks.10's, blocks.13-15 at blocks.15's; head,
   pool and fc at their own). ``--out``: float32 above, bf16 below."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch

import deepvis_repro as dv
from deepvis_repro.atlas.optimized import unit_image
from deepvis_repro.bf16 import runs_bf16
from deepvis_repro.images import save_image
from deepvis_repro.optimize import optimize
from deepvis_repro.optvis.convergence import Convergence
from deepvis_repro.optvis.preactivation import unclamped
from deepvis_repro.reproduce.metrics import class_ranks, ssim
from deepvis_repro.reproduce.stats import paired
from deepvis_repro.units import gather_units, layer_shapes, resolve_units

sys.path.insert(0, os.path.dirname(__file__))
from bench_atlas_fast import BATCH, describe_paired, tile  # noqa: E402

#: which measured layer stands for which of the embedded model's layers (step 4)
GROUPS = {"blocks.4": ["stem"] + [f"blocks.{i}" for i in range(8)],
          "blocks.10": [f"blocks.{i}" for i in range(8, 13)],
          "blocks.15": [f"blocks.{i}" for i in range(13, 16)],
          "head": ["head"], "pool": ["pool"], "fc": ["fc"]}


def exact_ms_per_step(backend, layer: str, steps: int) -> float:
    """float32, batch of 8, every unit stepping (the option on: head's and pool's would stop at once)."""
    units = [f"{layer}:{c}" for c in range(min(BATCH, layer_shapes(backend, [layer])[layer][0]))]
    run = lambda n: optimize(backend, units, "paper_3", steps=n, progress=False, pre_activation=True)
    run(2)  # warm-up
    t = time.perf_counter()
    run(steps)
    long = time.perf_counter() - t
    t = time.perf_counter()
    run(3)
    return (long - (time.perf_counter() - t)) / (steps - 3) * 1000


def value_in_float32(backend, r, units) -> np.ndarray:
    """Each best picture's objective, computed in float32 (the bf16 arm's own record is bf16's)."""
    layer = units[0].layer
    with torch.no_grad(), (unclamped(backend, [layer]) if (r.pre_activation or {}).get(layer)
                           else contextlib.nullcontext()):
        return gather_units(backend.forward(r.x, [layer]), units, backend).double().numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=8, help="units per layer, spread over its channels")
    ap.add_argument("--layers", default="blocks.4,blocks.10,blocks.15,head,pool,fc")
    ap.add_argument("--exact-steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--exact-only", action="store_true", help="only step 1: the exact mode's float32 cost per layer")
    args = ap.parse_args()
    backend = dv.load_backend()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    bf16_flags = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
    print(f"{cpu}, {os.cpu_count()} cores ({', '.join(bf16_flags) or 'no native bfloat16'}), torch "
          f"{torch.__version__}; paper_3, fast mode ({Convergence().describe()}), pre_activation, batches of {BATCH}")
    if not runs_bf16("cpu"):
        raise SystemExit("this CPU has no native bfloat16: numerics=bf16 would run float32 (nothing to compare)")

    print("1. exact mode, float32, ms per step of 8 units -> projected hours at 1,000 steps:", flush=True)
    exact_h = {}
    for layer in [l for l in backend.layers if l != "prob"]:
        ms = exact_ms_per_step(backend, layer, args.exact_steps)
        channels = layer_shapes(backend, [layer])[layer][0]
        exact_h[layer] = ms / 1000 * 1000 * channels / BATCH / 3600
        print(f"  {layer:<10} {channels:5d} units: {ms:6.0f} ms -> {exact_h[layer]:5.2f} h", flush=True)
    print(f"  every layer: {sum(exact_h.values()):.1f} h", flush=True)
    if args.exact_only:
        return

    judge = dv.load_backend("efficientnet_lite1")
    conv = Convergence()
    speed, rows, tiles = {}, [], ([], [])
    print("2. fast mode, float32 vs bf16:", flush=True)
    for li, layer in enumerate(args.layers.split(",")):
        channels = layer_shapes(backend, [layer])[layer][0]
        chans = [int(c) for c in np.linspace(0, channels - 1, args.units).round()]
        specs = [f"{layer}:{c}" for c in chans]
        units = resolve_units(backend, specs)
        arms = ("default", "bf16") if li % 2 == 0 else ("bf16", "default")
        res, took = {}, {}
        for numerics in arms:
            t = time.perf_counter()
            res[numerics] = optimize(backend, specs, "paper_3", batch_size=BATCH, progress=False, converge=conv,
                                     pre_activation=True, numerics=numerics)
            took[numerics] = time.perf_counter() - t
        f32, b16 = res["default"], res["bf16"]
        steps = {k: [r.converged.get(i, r.preset.steps - 1) + 1 for i in range(len(units))] for k, r in res.items()}
        v32, v16 = value_in_float32(backend, f32, units), value_in_float32(backend, b16, units)
        classes = chans if layer == backend.output_layer else [None] * len(units)
        r32, r16 = class_ranks(judge, f32.images, classes), class_ranks(judge, b16.images, classes)
        for i, u in enumerate(units):
            rows.append({"layer": layer, "v32": float(v32[i]), "v16": float(v16[i]), "r32": r32[i], "r16": r16[i],
                         "ssim": ssim(unit_image(backend, u, b16.images[i]), unit_image(backend, u, f32.images[i]))})
            tiles[0].append(tile(backend, u, f32.images[i]))
            tiles[1].append(tile(backend, u, b16.images[i]))
        per_unit = {k: v / len(units) for k, v in took.items()}
        exact_unit = exact_h[layer] * 3600 / channels
        speed[layer] = exact_unit / per_unit["bf16"], exact_unit / per_unit["default"]
        print(f"  {layer:<10} {len(units)} units: float32 {per_unit['default']:5.1f} s/unit, steps "
              f"{np.mean(steps['default']):.0f} ({min(steps['default'])}-{max(steps['default'])}); bf16 "
              f"{per_unit['bf16']:5.1f} s/unit, steps {np.mean(steps['bf16']):.0f} ({min(steps['bf16'])}-"
              f"{max(steps['bf16'])}): bf16 {per_unit['default'] / per_unit['bf16']:.2f}x float32's fast mode; "
              f"vs exact ({exact_unit:.1f} s/unit): fast {speed[layer][1]:.1f}x, fast+bf16 {speed[layer][0]:.1f}x; "
              f"value (float32) bf16 / float32 mean {np.mean(v16 / v32):.2f}", flush=True)

    print("3. the pictures, bf16 against float32 (both fast mode):")
    p = paired("bf16", [r["v16"] for r in rows], "float32", [r["v32"] for r in rows], "value")
    print(f"  value reached, measured in float32: float32 mean {np.mean([r['v32'] for r in rows]):.2f}, bf16 "
          f"{np.mean([r['v16'] for r in rows]):.2f}; {describe_paired(p, 'bf16 - float32')}")
    ranked = [r for r in rows if r["r32"] is not None]
    if ranked:
        p = paired("bf16", [r["r16"] for r in ranked], "float32", [r["r32"] for r in ranked], "rank")
        print(f"  judge's rank of fc's class (1 = top): float32 median {np.median([r['r32'] for r in ranked]):.0f}, "
              f"bf16 {np.median([r['r16'] for r in ranked]):.0f}; {describe_paired(p, 'bf16 - float32')}")
    s = [r["ssim"] for r in rows]
    print(f"  SSIM of each bf16 picture to its float32 one (as the atlas crops them): median {np.median(s):.2f}, "
          f"min {min(s):.2f}")

    print("4. the complete atlas (every layer, every unit's picture), projected:")
    fast_h = {"fast, float32": 0.0, "fast, bf16": 0.0}
    for rep, layers in GROUPS.items():
        if rep not in speed:
            raise SystemExit(f"--layers lacks {rep}, which stands for {', '.join(layers)}")
        for layer in layers:
            fast_h["fast, bf16"] += exact_h[layer] / speed[rep][0]
            fast_h["fast, float32"] += exact_h[layer] / speed[rep][1]
    total = sum(exact_h.values())
    print(f"  exact, float32 {total:.1f} h; " + "; ".join(f"{k} {v:.1f} h ({total / v:.1f}x)" for k, v in fast_h.items()))
    if args.out:
        save_image(args.out, np.concatenate([np.concatenate(t, 1) for t in tiles], 0), quality=90)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
