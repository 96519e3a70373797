"""Issue 33, step 2: the atlas's fast mode (`deepvis-optimize ... optimize.fast=true`: each unit
stops once its objective has converged, optvis/convergence.py) against the exact mode (paper_3's
full 1,000 steps), side by side in one run on the same units, with the harness's statistics.

    python benchmarks/bench_atlas_fast.py [--fc 12] [--hidden 6] [--layers blocks.4,blocks.10,blocks.15]
                                          [--out docs/atlas_fast_vs_exact.jpg] [--dead] [--device cuda]

For each layer, its first units (fc: classes spread over the 1,000) run as the atlas runs them
(batches of 8, the worker's call to ``optimize``) in both modes; printed per layer: the time of
each mode, the fast mode's mean stopping step, and for all units together the paired
comparison (Wilcoxon, bootstrap 95% CI of the median difference: reproduce/stats.py) of the
activation reached and, for fc's class units, the rank of the class under the harness's judge
(EfficientNet-Lite1, a second network). --dead counts each layer's units whose gradient is
exactly zero at the start image (both modes stop those at step 0: they cost nothing). --out
writes the pictures, exact above fast, as the atlas crops them. --engines N instead times the
fast atlas command on fc's first N units, each arm a fresh process with its tree's peak memory:
in one process and on Ray with one single-threaded actor per core (the "more processes" lever;
--steps S: S steps of every unit instead, the steady throughput; --rounds R: interleaved);
--batches fc,blocks.3 the cost per unit-step at batches of 8, 16 and 32 (the "batching" lever).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import deepvis_repro as dv
from deepvis_repro.atlas.optimized import unit_image
from deepvis_repro.images import save_image
from deepvis_repro.optimize import optimize, start_images
from deepvis_repro.optvis.convergence import Convergence
from deepvis_repro.reproduce.metrics import class_ranks, ssim
from deepvis_repro.reproduce.stats import bootstrap_ci, paired
from deepvis_repro.units import gather_units, layer_shapes, resolve_units

BATCH = 8  # the atlas's default batch (optimize.batch_size)


def run(backend, units, converge):
    t = time.perf_counter()
    r = optimize(backend, units, "paper_3", batch_size=BATCH, progress=False, converge=converge)
    return r, time.perf_counter() - t


def dead_units(backend, layer) -> int:
    """Units of the layer with an exactly zero gradient at the start image (the optimizer stops them)."""
    channels = layer_shapes(backend, [layer])[layer][0]
    zero = 0
    for s in range(0, channels, 64):
        units = resolve_units(backend, [f"{layer}:{c}" for c in range(s, min(channels, s + 64))])
        x = start_images(backend, len(units), "mean_plus_rand", 0).requires_grad_(True)
        (g,) = torch.autograd.grad(gather_units(backend.forward(x, [layer]), units, backend).sum(), x)
        zero += int((g.flatten(1) == 0).all(1).sum())
    return zero


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and its descendants, MB (shared pages counted once)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("Pss:")) / 1024
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue  # a process that ended meanwhile
    return total


def timed_command(args: list[str]) -> tuple[float, float]:
    """Run a command; (seconds, peak PSS in GB of its process tree, sampled every 0.5 s)."""
    import subprocess

    t = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while p.poll() is None:
        peak = max(peak, tree_pss_mb(p.pid))
        time.sleep(0.5)
    took = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {p.stderr.read()[-2000:]}")
    return took, peak / 1024


def engines(n: int, steps: int | None = None, rounds: int = 1, overrides: tuple[str, ...] = ()) -> None:
    """The fast mode's atlas command on fc's first n units, each arm a fresh process timed from
    its start: in one process (torch's threads on every core) and in one Ray actor per core with
    one thread each; with each arm's peak memory (PSS of its process tree: shared pages counted
    once) and the activations' paired difference to the one-process arm (other threads round the convolutions differently:
    not the same bits, the same pictures statistically). steps: instead of the fast mode, that
    many steps of every unit (the steady throughput, without the fast mode's uneven batches,
    which leave one actor idle at the end of a short run); rounds: the arms interleaved; overrides:
    more overrides for both arms (optimize.numerics=bf16)."""
    import json
    import tempfile

    units = "units=[" + ",".join(f"fc:{c}" for c in range(n)) + "]"
    cores = os.cpu_count() or 1
    arms = [("local, 1 process", []),
            (f"ray, {cores} actors x 1 thread", ["engine=ray", f"engine.actors={cores}", "engine.num_cpus=1",
                                                 "engine.threads=1"])]
    mode = [f"optimize.steps={steps}"] if steps else ["optimize.fast=true"]
    what = (f"{steps} steps of each unit" if steps else "fast atlas") + "".join(f", {o}" for o in overrides)
    with tempfile.TemporaryDirectory() as tmp:
        acts = {}
        for r in range(rounds):
            for k, (name, options) in enumerate(arms):
                folder = os.path.join(tmp, f"{r}-{k}")
                took, peak = timed_command(["deepvis-optimize", units, *mode, f"optimize.batch_size={BATCH}",
                                            f"atlas.dir={folder}", *options, *overrides])
                with open(os.path.join(folder, "regularized_opt", "fc", "results.json")) as f:
                    rec = json.load(f)["units"]
                acts[name] = [rec[str(c)]["best_activation"] for c in range(n)]
                base = arms[0][0]
                same = "" if name == base or r else "; activation vs one process: " + describe_paired(
                    paired(name, acts[name], base, acts[base], "act"))
                print(f"  {what}, fc:0..{n - 1}, {name}: {took:.0f} s ({n / took:.3f} units/s), "
                      f"peak PSS {peak:.2f} GB{same}", flush=True)


def describe_paired(p, what: str = "") -> str:
    return (f"paired difference {what + ' ' if what else ''}over {p.n} units: median {p.median_difference:+.2f} "
            f"[{p.low:+.2f}, {p.high:+.2f}], p = {p.p_value if p.p_value is None else format(p.p_value, '.2g')}")


def batch_sizes(backend, layers, sizes=(8, 16, 32)) -> None:
    """Milliseconds per unit-step of paper_3 at each batch size: 13 steps minus 3 steps of a fresh
    optimize call (the start-up cancels), after one warm-up call."""
    for layer in layers:
        row = []
        for n in sizes:
            units = [f"{layer}:{c}" for c in range(n)]
            optimize(backend, units, "paper_3", steps=3, progress=False)
            t = time.perf_counter()
            optimize(backend, units, "paper_3", steps=13, progress=False)
            long = time.perf_counter() - t
            t = time.perf_counter()
            optimize(backend, units, "paper_3", steps=3, progress=False)
            short = time.perf_counter() - t
            row.append(f"{(long - short) / 10 / n * 1000:.1f} at {n}")
        print(f"  {layer}: ms per unit-step " + ", ".join(row), flush=True)


def tile(backend, unit, image, size=96):
    from PIL import Image
    return np.asarray(Image.fromarray(unit_image(backend, unit, image)).resize((size, size), Image.BILINEAR))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fc", type=int, default=12, help="fc class units, spread over the classes")
    ap.add_argument("--hidden", type=int, default=6, help="units per hidden layer")
    ap.add_argument("--layers", default="blocks.4,blocks.10,blocks.15")
    ap.add_argument("--out", default=None, help="a picture of every unit, exact above fast")
    ap.add_argument("--dead", action="store_true", help="count zero-gradient units of every layer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engines", type=int, default=0, metavar="N",
                    help="instead: time the fast atlas of fc's first N units in one process and on Ray, "
                         "one single-threaded actor per core")
    ap.add_argument("--steps", type=int, default=None, help="--engines: this many steps per unit, not the fast mode")
    ap.add_argument("--rounds", type=int, default=1, help="--engines: the arms this many times, interleaved")
    ap.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                    help="--engines: more overrides for both arms, e.g. optimize.numerics=bf16")
    ap.add_argument("--batches", default=None, metavar="LAYERS",
                    help="instead: ms per unit-step at batches of 8, 16 and 32 on these layers (comma-separated)")
    args = ap.parse_args()
    backend = dv.load_backend().to(args.device)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    conv = Convergence()
    if args.device.startswith("cuda"):
        cpu = torch.cuda.get_device_name()
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}; paper_3 (1,000 steps) exact vs fast "
          f"({conv.describe()}), batches of {BATCH}", flush=True)
    if args.dead:
        for layer in [l for l in backend.layers if l != "prob"]:
            print(f"  {layer}: {dead_units(backend, layer)} of {layer_shapes(backend, [layer])[layer][0]} units "
                  "have a zero gradient at the start image", flush=True)
    if args.engines:
        engines(args.engines, steps=args.steps, rounds=args.rounds, overrides=tuple(args.options))
        return
    if args.batches:
        batch_sizes(backend, args.batches.split(","))
        return
    judge = dv.load_backend("efficientnet_lite1").to(args.device)  # the harness's judge (conf/reproduce.yaml)
    groups = [("fc", [int(c) for c in np.linspace(0, 999, args.fc).round()])]
    groups += [(l, list(range(args.hidden))) for l in args.layers.split(",") if l]
    rows, tiles = [], ([], [])
    total = {"exact": 0.0, "fast": 0.0}
    for layer, channels in groups:
        units = [f"{layer}:{c}" for c in channels]
        exact, t_exact = run(backend, units, None)
        fast, t_fast = run(backend, units, conv)
        total["exact"] += t_exact
        total["fast"] += t_fast
        stops = [fast.converged.get(i, 999) + 1 for i in range(len(units))]
        # how the exact run's best-so-far creeps: the step each unit first reached 90% of its final value
        best = np.fmax.accumulate(np.nan_to_num(exact.history, nan=-np.inf), axis=0)
        to90 = [int(np.argmax(best[:, i] >= 0.9 * best[-1, i])) + 1 for i in range(len(units)) if best[-1, i] > 0]
        classes = channels if layer == backend.output_layer else [None] * len(units)
        rank_e = class_ranks(judge, exact.images, classes)
        rank_f = class_ranks(judge, fast.images, classes)
        for i, u in enumerate(exact.units):
            rows.append({"layer": layer, "unit": str(u), "act_exact": float(exact.best_activation[i]),
                         "act_fast": float(fast.best_activation[i]), "rank_exact": rank_e[i], "rank_fast": rank_f[i],
                         "ssim": ssim(unit_image(backend, u, fast.images[i]), unit_image(backend, u, exact.images[i]))})
            if args.out:
                tiles[0].append(tile(backend, u, exact.images[i]))
                tiles[1].append(tile(backend, u, fast.images[i]))
        print(f"{layer:<10} {len(units):3d} units: exact {t_exact:7.1f} s, fast {t_fast:6.1f} s "
              f"({t_exact / t_fast:.2f}x); steps run, fast: mean {np.mean(stops):.0f} (min {min(stops)}, "
              f"max {max(stops)}); activation reached, fast / exact: mean "
              f"{np.mean([r['act_fast'] / r['act_exact'] for r in rows if r['layer'] == layer]):.2f}; "
              f"the exact run reached 90% of its final value at steps {min(to90, default=0)}-{max(to90, default=0)}",
              flush=True)
    print(f"all: exact {total['exact']:.0f} s, fast {total['fast']:.0f} s: {total['exact'] / total['fast']:.2f}x")
    for measure in ("act", "rank"):
        e = [r[f"{measure}_exact"] for r in rows]
        f = [r[f"{measure}_fast"] for r in rows]
        p = paired("fast", f, "exact", e, measure)
        if p is None:
            continue
        stat = np.median if measure == "rank" else np.mean
        ce = bootstrap_ci([v for v in e if v is not None], stat)
        cf = bootstrap_ci([v for v in f if v is not None], stat)
        name = "judge rank of the class (median; 1 = top)" if measure == "rank" else "activation (mean)"
        print(f"{name}: exact {ce.estimate:.1f} [{ce.low:.1f}, {ce.high:.1f}], fast {cf.estimate:.1f} "
              f"[{cf.low:.1f}, {cf.high:.1f}]; {describe_paired(p, 'fast - exact')}")
    s = [r["ssim"] for r in rows]
    print(f"SSIM of each unit's fast picture to its exact one (as the atlas crops them): median {np.median(s):.2f}, "
          f"min {min(s):.2f}")
    if args.out:
        save_image(args.out, np.concatenate([np.concatenate(t, 1) for t in tiles], 0), quality=90)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
