"""The receptive-field probe's time and peak memory on models that made it run away (issue 35):
a 320 px U-Net (upsampled layers, whose neighbouring units share fields) and a squeeze-excite
net (every unit sees every pixel), every layer, each model in a process of its own.

    python benchmarks/bench_receptive.py [--size 320]

Prints, per model, each layer's field, how it was found, its seconds, and the process's peak
resident memory (torch's own ~0.6 GB included).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

SCRIPT = """
import resource, sys, time
sys.path.insert(0, {tests!r})
from test_model_files_round3 import SENet, UNet, _hooked
from deepvis_repro.atlas.receptive import layer_geometry
model, layers = {{"unet": (UNet, ["d1", "d2", "d3", "u2", "u1"]), "se": (SENet, ["c1", "se1", "c2", "se2"])}}[{which!r}]
b = _hooked(model(), layers, {size})
t0 = time.perf_counter()
for l in layers:
    t = time.perf_counter()
    g = layer_geometry(b, l)
    print(f"  {{l:<4}} field {{'whole' if g.whole else g.size_y}} px, stride {{g.stride_y}}, {{g.method}}: "
          f"{{time.perf_counter() - t:.2f}} s", flush=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(f"  every layer: {{time.perf_counter() - t0:.1f}} s, process peak {{peak:.2f}} GB")
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=320)
    args = ap.parse_args()
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
    for which in ("unet", "se"):
        print(f"{which}, {args.size} px:", flush=True)
        subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests, which=which, size=args.size)], check=True)


if __name__ == "__main__":
    main()
