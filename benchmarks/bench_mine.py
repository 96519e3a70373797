"""Mining speed and memory, side by side in one run.

    python benchmarks/bench_mine.py                 # throughput and memory on this machine's CPU
    python benchmarks/bench_mine.py --device cuda   # on a GPU (JPEG decoding in worker processes)
    python benchmarks/bench_mine.py --ray           # also the Ray engine on the same corpus

1. Throughput (images/s), embedded model, every layer, k=9: mining vs a plain forward pass to the
   deepest mined layer over the same images, batches and DataLoader workers. The ratio is what the
   bookkeeping (spatial max and position per channel, the top-k merge) costs.
2. Montages per second: max_im and max_deconv of every unit of blocks.10 and 200 fc units, in
   float32 and bf16.
3. Peak RSS of a mining run over 200 and 2,000 images (each in a fresh process): the state is
   O(channels * k), so it must not grow with the corpus.
4. With --ray: the Ray engine (local cluster) against the local engine, startup reported apart.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import numpy as np

from deepvis_repro.allocator import keep_freed_memory


def corpus_list(n: int, folder: str) -> str:
    from deepvis_repro.atlas.corpus import demo_corpus

    items = demo_corpus().items
    path = os.path.join(folder, f"corpus_{n}.txt")
    with open(path, "w") as f:
        f.write("\n".join((items * (n // len(items) + 1))[:n]))
    return path


def throughput(args) -> None:
    import torch

    import deepvis_repro as dv
    from deepvis_repro.atlas import mine
    from deepvis_repro.atlas.corpus import open_corpus
    from deepvis_repro.atlas.engine import LocalEngine, _BatchDataset
    from deepvis_repro.atlas.mining import MiningJob
    from deepvis_repro.numerics import Numerics

    backend = dv.load_backend().to(args.device)
    corpus = open_corpus(corpus_list(args.images, args.tmp))
    layers = list(backend.layers)
    job = MiningJob(backend, layers, 9, False, corpus, args.batch_size)
    engine = LocalEngine(workers=args.workers)
    mean = backend.mean_image().to(backend.device).unsqueeze(0)

    def plain(numerics="default"):
        loader = torch.utils.data.DataLoader(_BatchDataset(job, range(job.n_batches)), batch_size=None,
                                             num_workers=engine.workers, collate_fn=lambda b: b,
                                             pin_memory=backend.device.type == "cuda")
        t, c = time.perf_counter(), time.process_time()
        for b in loader:
            x = b["images"].to(backend.device, non_blocking=True).permute(0, 3, 1, 2).float() - mean
            with torch.no_grad(), Numerics(numerics).active(backend.device):
                out = backend.forward(x, [layers[-1]])
            out[layers[-1]].sum().item()  # wait for the device
        return len(corpus) / (time.perf_counter() - t), time.process_time() - c

    def mining(numerics="default"):
        t, c = time.perf_counter(), time.process_time()
        r = mine(backend, corpus, layers, top_k=9, batch_size=args.batch_size, engine=engine, progress=False,
                 numerics=numerics)
        r.values[layers[-1]].sum()
        return len(corpus) / (time.perf_counter() - t), time.process_time() - c

    med = lambda v: float(np.median(v))  # noqa: E731
    print(f"device {args.device} ({device_name(args.device)}), {len(corpus)} images, batch {args.batch_size}, "
          f"{engine.workers} decode worker(s), torch threads {torch.get_num_threads()}, all {len(layers)} layers, "
          f"k=9, {args.repeats} pairs each")
    for numerics in ("default", "bf16"):
        plain(numerics)  # warm-up: first batches, worker start, allocator
        runs = []  # interleaved pairs: a noisy neighbour slows both sides of a pair alike
        for _ in range(args.repeats):
            runs.append((plain(numerics), mining(numerics)))
        p, m = med([a[0] for a, _ in runs]), med([b[0] for _, b in runs])
        ratio = med([b[0] / a[0] for a, b in runs])
        cpu = med([a[1] / b[1] for a, b in runs])
        name = "float32" if numerics == "default" else "bf16"
        print(f" numerics={numerics} ({name}):")
        print(f"  plain forward to {layers[-1]}: {p:7.1f} images/s median   (runs: {', '.join(f'{a[0]:.1f}' for a, _ in runs)})")
        print(f"  mining:                 {m:7.1f} images/s median   (runs: {', '.join(f'{b[0]:.1f}' for _, b in runs)})")
        print(f"  mining / plain, median of the pairs: {ratio:.3f} in images/s; {cpu:.3f} in the main process's "
              "CPU seconds (decoding is in workers for both)", flush=True)


def device_name(device: str) -> str:
    import torch

    from deepvis_repro.outputs import machine

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    m = machine()
    return f"{m['cpu']}, {m['isa']}"


def montage_rate(args) -> None:
    """Montages (max_im + guided-backprop max_deconv, 3x3 tiles) per second, on an atlas mined
    from the same corpus: every unit of blocks.10 and the first --montage-units of fc, in float32
    and bf16 (each from scratch)."""
    import shutil

    import deepvis_repro as dv
    from deepvis_repro.atlas import mine
    from deepvis_repro.atlas.patches import render_montages

    backend = dv.load_backend().to(args.device)
    atlas = os.path.join(args.tmp, "atlas")
    mine(backend, corpus_list(args.images, args.tmp), ["blocks.10", "fc"], top_k=9, batch_size=args.batch_size,
         atlas_dir=atlas, progress=False)
    print(f"montages ({args.images}-image corpus, k=9, guided backprop, tiles written as JPEG):")
    for numerics in ("default", "bf16"):
        for layer, units in (("blocks.10", None), ("fc", range(args.montage_units))):
            for kind in ("max_im", "max_deconv"):
                shutil.rmtree(os.path.join(atlas, kind), ignore_errors=True)
            t = time.perf_counter()
            n = render_montages(backend, atlas, layers=[layer], units=units, progress=False, numerics=numerics)[layer]
            dt = time.perf_counter() - t
            print(f"  numerics={numerics:<7} {layer:<9} {n} units in {dt:5.1f} s: {n / dt:5.2f} units/s "
                  f"({1000 * dt / n:.0f} ms per unit)", flush=True)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not carry over the parent's peak
    through fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(args) -> None:
    import deepvis_repro as dv
    from deepvis_repro.atlas import mine

    backend = dv.load_backend()
    path = corpus_list(args.rss, args.tmp)
    before = peak_rss_mb()
    mine(backend, path, None, top_k=9, batch_size=args.batch_size, progress=False)
    print(f"{args.rss} {before:.0f} {peak_rss_mb():.0f}")


def memory(args) -> None:
    print("peak RSS of a mining run (embedded model, every layer, k=9), each in a fresh process:")
    for n in (200, 2000):
        out = subprocess.run([sys.executable, __file__, "--rss", str(n), "--tmp", args.tmp,
                              "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
        n_, before, after = out.stdout.split()
        print(f"  {n_:>5} images: {after} MB (before mining, model loaded: {before} MB)")


def ray_vs_local(args) -> None:
    import ray

    import deepvis_repro as dv
    from deepvis_repro.atlas import mine
    from deepvis_repro.atlas.corpus import open_corpus

    backend = dv.load_backend()
    corpus = open_corpus(corpus_list(args.ray_images, args.tmp))
    layers = list(backend.layers)
    t = time.perf_counter()
    local = mine(backend, corpus, layers, top_k=9, batch_size=args.batch_size, progress=False)
    t_local = time.perf_counter() - t
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), object_store_memory=300_000_000, include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")
    t_start = time.perf_counter() - t
    t = time.perf_counter()
    remote = mine(backend, corpus, layers, top_k=9, batch_size=args.batch_size, progress=False, engine="ray",
                  engine_options={"actors": args.actors, "num_cpus": 2 / (args.actors + 2), "decode_cpus": 0.5})
    t_ray = time.perf_counter() - t
    ray.shutdown()
    same = all((remote.values[l] == local.values[l]).all() and (remote.image_ids[l] == local.image_ids[l]).all()
               for l in layers)
    print(f"Ray vs local, {len(corpus)} images, all layers, k=9 ({args.actors} actor(s)):")
    print(f"  local: {t_local:6.1f} s ({len(corpus) / t_local:.1f} images/s)")
    print(f"  ray:   {t_ray:6.1f} s ({len(corpus) / t_ray:.1f} images/s), plus {t_start:.1f} s ray.init; "
          f"{t_ray / t_local:.2f}x the local time; identical result: {same}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--ray-images", type=int, default=200)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--montage-units", type=int, default=200, help="fc units whose montages are timed")
    ap.add_argument("--rss", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    keep_freed_memory()  # what every deepvis command does first (deepvis_repro/allocator.py)
    if args.tmp is None:
        import tempfile

        args.tmp = tempfile.mkdtemp(prefix="bench_mine_")
    if args.rss:
        return rss_child(args)
    throughput(args)
    montage_rate(args)
    if not args.no_memory:
        memory(args)
    if args.ray:
        ray_vs_local(args)


if __name__ == "__main__":
    main()
