"""Montage speed on wide layers, the unit's deconv computed on its receptive field (a crop) and
on the whole image, side by side in one run, and how far their pictures differ.

    python benchmarks/bench_montage_wide.py [--units 32] [--images 400]

Models: torchvision VGG16 at 320 px (random weights: the speed does not depend on them), its
conv3_3 (features.15: 256 channels, 80x80, a 40 px field) and conv4_3 (features.22: 512
channels, a 92 px field), as issue 35's text detector; and the embedded EfficientNet-Lite0's
blocks.4 (a 67 px field) and blocks.8 (211 px: the crop covers most of the input, so the whole
image is used, said in the manifest). Each layer is mined over the demo corpus, then the same
units' max_im + max_deconv montages are rendered both ways; the deconv montages' largest pixel
difference (before JPEG) and the share of pixels that differ are printed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np


def run(backend, layer, atlas, units, force_whole):
    from deepvis_repro.atlas import patches
    from deepvis_repro.atlas.patches import render_montages, resolve_mode

    tiles, save = {}, patches.save_image

    def keep(path, image):  # the montages as computed, before JPEG (whose rounding amplifies 1 level)
        if os.sep + "max_deconv" + os.sep in path:
            tiles[os.path.basename(path)] = image.astype(int)
        save(path, image)

    patches.save_image = keep

    for kind in ("max_im", "max_deconv"):
        shutil.rmtree(os.path.join(atlas, kind), ignore_errors=True)
    cache = backend.cache("field_backprop")
    cache.clear()
    if force_whole:
        cache[(layer, resolve_mode(backend, "auto"))] = "whole image: forced by the benchmark"
    t = time.perf_counter()
    try:
        n = render_montages(backend, atlas, layers=[layer], units=units, progress=False)[layer]
    finally:
        patches.save_image = save
    dt = time.perf_counter() - t
    import json
    how = json.load(open(os.path.join(atlas, "manifest.json")))["montages"][layer].get("backprop")
    return n / dt, how, tiles


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=32)
    ap.add_argument("--images", type=int, default=400)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    import deepvis_repro as dv
    from deepvis_repro.allocator import keep_freed_memory
    from deepvis_repro.atlas import mine
    from deepvis_repro.atlas.corpus import demo_corpus
    from deepvis_repro.atlas.receptive import layer_geometry

    keep_freed_memory()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"{args.units} units per layer, k=9, {args.images} demo images", flush=True)
    models = [("VGG16 320 px", dv.load_backend("torchvision", arch="vgg16", input_size=320),
               ["features.15", "features.22"]),
              ("EfficientNet-Lite0", dv.load_backend(), ["blocks.4", "blocks.8"])]
    with tempfile.TemporaryDirectory() as tmp:
        items = demo_corpus().items
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
            f.write("\n".join((items * (args.images // len(items) + 1))[:args.images]))
        for name, backend, layers in models:
            atlas = os.path.join(tmp, name.replace(" ", "_"))
            mine(backend, corpus, layers, top_k=9, batch_size=16, atlas_dir=atlas, progress=False)
            for layer in layers:
                g = layer_geometry(backend, layer)
                units = list(range(args.units))
                whole, _, d_whole = run(backend, layer, atlas, units, True)
                field, how, d_field = run(backend, layer, atlas, units, False)
                diff = max(int(np.abs(d_whole[f] - d_field[f]).max()) for f in d_whole)
                share = np.mean([np.mean(d_whole[f] != d_field[f]) for f in d_whole])
                print(f"{name} {layer}: field {g.size_y} px, stride {g.stride_y}: whole image {whole:6.2f} units/s, "
                      f"field {field:6.2f} units/s ({field / whole:4.1f}x; {how}); deconv montages differ by at most "
                      f"{diff} of 255 in {100 * share:.2f}% of pixels", flush=True)


if __name__ == "__main__":
    sys.exit(main())
