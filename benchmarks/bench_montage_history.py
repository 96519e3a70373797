"""Montage speed of several commits side by side: each commit's own ``render_montages`` (its
package, backends and configs, from a git worktree), one after the other in fresh processes on
an atlas each mines from the same 400-image corpus; every unit of blocks.10 and the first 200
units of fc, in float32 (and bf16 where the commit has it).

    python benchmarks/bench_montage_history.py 5f271a5 21b97a1 HEAD
    python benchmarks/bench_montage_history.py 5f271a5 HEAD 5f271a5 HEAD   # interleaved, on a noisy machine

Each process uses its commit's allocator setting if it has one (deepvis_repro/allocator.py),
as its commands would. Run it on an idle machine: the commits run in turn, not interleaved.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import inspect, os, shutil, sys, time
import deepvis_repro as dv
assert os.path.dirname(dv.__file__).startswith(sys.argv[2]), dv.__file__  # the commit's own code
try:  # a module the commit lacks may still be found in the installed package: only the commit's
    from deepvis_repro import allocator
    if allocator.__file__.startswith(sys.argv[2]):
        allocator.keep_freed_memory()
        print("  (its allocator setting made)")
except ImportError:
    pass
from deepvis_repro.atlas import mine
from deepvis_repro.atlas.corpus import demo_corpus
from deepvis_repro.atlas.patches import render_montages

tmp = sys.argv[1]
items = demo_corpus().items
corpus = os.path.join(tmp, "corpus.txt")
with open(corpus, "w") as f:
    f.write("\n".join((items * (400 // len(items) + 1))[:400]))
backend = dv.load_backend()
atlas = os.path.join(tmp, "atlas")
mine(backend, corpus, ["blocks.10", "fc"], top_k=9, batch_size=32, atlas_dir=atlas, progress=False)
modes = ["default", "bf16"] if "numerics" in inspect.signature(render_montages).parameters else ["default"]
for numerics in modes:
    for layer, units in (("blocks.10", None), ("fc", range(200))):
        for kind in ("max_im", "max_deconv"):
            shutil.rmtree(os.path.join(atlas, kind), ignore_errors=True)
        kw = {"numerics": numerics} if len(modes) > 1 else {}
        t = time.perf_counter()
        n = render_montages(backend, atlas, layers=[layer], units=units, progress=False, **kw)[layer]
        dt = time.perf_counter() - t
        print(f"  numerics={numerics:<7} {layer:<9} {n} units in {dt:5.1f} s: {n / dt:5.2f} units/s "
              f"({1000 * dt / n:.0f} ms per unit)", flush=True)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("commits", nargs="+")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n, commit in enumerate(args.commits):  # a commit may be named twice (A B A B: interleaved)
            tree = os.path.join(tmp, f"tree_{n}_{commit}")
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", tree, commit],
                           check=True, capture_output=True)
            try:
                # the commit's backends and configs under the names the installed package maps
                names = os.path.join(tmp, f"names_{n}_{commit}")
                os.makedirs(names)
                os.symlink(os.path.join(tree, "backends"), os.path.join(names, "deepvis_repro_backends"))
                os.symlink(os.path.join(tree, "conf"), os.path.join(names, "deepvis_repro_conf"))
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, names]))
                work = os.path.join(tmp, f"work_{n}_{commit}")
                os.makedirs(work)
                print(f"commit {commit}:", flush=True)
                subprocess.run([sys.executable, "-c", CHILD, work, tree], env=env, check=True, cwd=work)  # not this checkout
            finally:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)


if __name__ == "__main__":
    main()
