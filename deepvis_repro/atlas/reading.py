"""A unit's reading: what a judge network says its top patches show, and how the unit responds
over the corpus; stored in the atlas as ``reading/<layer>.json``, shown by the live view's pane
and the site.

The reading is a description, not a proven concept: the judge (an ImageNet classifier: the
embedded EfficientNet-Lite0 unless another is given) classifies each of the unit's top-k
patches (the field cut from the image as the network saw it, as in the max_im montage), and the
most frequent classes are kept with their share (4 of 9 patches: "tabby cat"). Where a field is
small (under ``MIN_PATCH`` pixels a side) a classifier has nothing to go on, and where it is the
whole input the patch is the image: those layers are read from their top *images* (said in the
reading's ``basis``). Patches shared by several units (the same image and box) are judged once.

The distribution: each unit's spatial maximum over a sample of the corpus (the first
``sample`` images, as the miner computes it), as a histogram of ``BINS`` bins between the
sample's minimum and maximum; with the top-k values of the whole corpus on the site it says
whether a unit's top patches are typical or rare.
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from ..errors import DeepvisError
from ..files import write_json
from ..layout import PREFIX
from ..progress import progress as progress_bar
from ..registry import load_backend
from .corpus import BatchDecoder, load_items
from .patches import ViewCache, display_box
from .receptive import crop_box, layer_geometry
from .store import AtlasStore, load_reading, reading_path

MIN_PATCH = 48
TOP_CLASSES = 3
BINS = 24


def _judge_classes(judge, images: list[np.ndarray], batch: int = 32) -> list[int]:
    out = []
    layer = judge.output_layer
    for s in range(0, len(images), batch):
        x = torch.cat([judge.preprocess(im) for im in images[s:s + batch]])
        with torch.no_grad():
            out += judge.forward(x, [layer])[layer].flatten(1).argmax(1).tolist()
    return out


def layer_reading(backend, store: AtlasStore, layer: str, judge, cache: ViewCache, judged: dict) -> dict:
    """The reading of every unit of one mined layer (see the module docstring)."""
    arrays = store.layer_arrays(layer)
    geometry = layer_geometry(backend, layer)
    H, W = backend.input_size
    ids, pos = arrays["image_ids"], arrays["positions"]
    C, k = ids.shape
    side = max(geometry.size_y, geometry.size_x)
    patches = not geometry.whole and MIN_PATCH <= side and display_box(geometry, 0, 0, (H, W)) != (0, 0, H, W)
    rows = backend_map_rows(store, layer)
    keys = []
    for c in range(C):
        row = []
        for j in range(k):
            i = int(ids[c, j])
            if i < 0:
                continue
            y, x = (int(v) for v in pos[c, j])
            box = display_box(geometry, y, x, (H, W)) if patches and y < rows else (0, 0, H, W)
            row.append((i, box))
        keys.append(row)
    todo = sorted({key for row in keys for key in row if key not in judged})
    for s in range(0, len(todo), 64):
        part = todo[s:s + 64]
        views = cache.get_many([i for i, _ in part])
        ok = [(key, v) for key, v in zip(part, views) if v is not None]
        classes = _judge_classes(judge, [crop_box(v, box) for (_, box), v in ok])
        judged.update({key: c for (key, _), c in zip(ok, classes)})
        judged.update({key: None for key, v in zip(part, views) if v is None})
    labels = judge.labels or []
    units = []
    for row in keys:
        counts = Counter(judged[key] for key in row if judged.get(key) is not None)
        units.append([[labels[c] if c < len(labels) else f"class {c}", n]
                      for c, n in counts.most_common(TOP_CLASSES)])
    return {"layer": layer, "basis": "patches" if patches else "images", "judge": judge.name, "k": int(k),
            "units": units}


def backend_map_rows(store: AtlasStore, layer: str) -> int:
    """Rows of the layer's map (a position on row H is a prefix token: judged on the whole image)."""
    shape = ((store.manifest() or {}).get("layers", {}).get(layer) or {}).get("shape") or []
    return int(shape[1]) if len(shape) == 3 else 1 << 30


def distributions(backend, store: AtlasStore, layers: list[str], sample: int, batch_size: int = 16) -> dict:
    """Per layer: (C, BINS) histogram counts of each unit's spatial maximum over the first
    ``sample`` corpus images, and the (lo, hi) range of each unit's bins."""
    items = store.corpus()[:sample]
    decoder = BatchDecoder(backend.view_spec())
    maxima: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    for s in range(0, len(items), batch_size):
        imgs = [im for im in load_items(items[s:s + batch_size]) if not isinstance(im, Exception)]
        if not imgs:
            continue
        x = backend.views_to_x(torch.from_numpy(np.stack([decoder.fit(im) for im in imgs])))

        def reduce(layer, a):
            if layer.endswith(PREFIX):
                return
            a = a.float()
            maxima[layer].append((a.flatten(2).amax(2) if a.dim() > 2 else a.flatten(1)).cpu().numpy())

        with torch.no_grad():
            backend.stream(x, layers, reduce)
    out = {}
    for l, parts in maxima.items():
        if not parts:
            continue
        v = np.concatenate(parts)  # (N, C)
        lo, hi = v.min(0), v.max(0)
        span = np.where(hi > lo, hi - lo, 1.0)
        b = np.clip(((v - lo) / span * BINS).astype(int), 0, BINS - 1)
        counts = np.stack([np.bincount(b[:, c], minlength=BINS) for c in range(v.shape[1])])
        out[l] = {"images": int(v.shape[0]), "lo": lo.tolist(), "hi": hi.tolist(), "counts": counts.tolist()}
    return out


def write_readings(backend, atlas_dir, judge=None, layers=None, sample: int = 400, progress: bool = True) -> dict:
    """reading/<layer>.json for every mined layer (or the given ones): the units' readings and
    activation distributions. judge: a backend with class labels (default: the embedded model).
    Returns {layer: path}."""
    store = AtlasStore(atlas_dir)
    manifest = store.manifest()
    if manifest is None or "layers" not in manifest:
        raise DeepvisError(f"{store.root} holds no finished mining: run deepvis-mine first")
    mined = list(manifest["layers"])
    layers = mined if layers in (None, "all") else [backend.resolve_layer(l) for l in layers]
    if judge is None:
        judge = load_backend()
    if not judge.labels:
        raise DeepvisError(f"the judge {judge.name} has no class labels: a reading names classes")
    items = store.corpus()
    paths = {l: reading_path(store, l) for l in layers}
    # a rerun (deepvis-mine resumes) keeps the readings made by the same judge on the same sample
    todo = [l for l in layers if (load_reading(store.root, l) or {}).get("made") != {
        "judge": judge.name, "sample": min(sample, len(items)), "k": manifest.get("top_k")}]
    if not todo:
        return paths
    cache = ViewCache(items, backend.view_spec())
    dist = distributions(backend, store, todo, sample)
    judged: dict = {}
    bar = progress_bar(total=len(todo), desc="readings", unit="layer", enabled=progress)
    for layer in todo:
        r = layer_reading(backend, store, layer, judge, cache, judged)
        r["distribution"] = dist.get(layer)
        r["made"] = {"judge": judge.name, "sample": min(sample, len(items)), "k": manifest.get("top_k")}
        path = reading_path(store, layer)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, r)
        bar.update(1)
    bar.close()
    return paths
