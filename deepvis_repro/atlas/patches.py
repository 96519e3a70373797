"""A unit's pictures from the mined atlas: its top-k image patches and their deconv, as montages.

A patch is the unit's receptive field at the position of its maximum, cut from the image as the
network saw it (after the backend's resize and crop), zero-filled where the field leaves the
image; when the field is larger than the whole input (deep layers, fc) the patch is the whole
input, as the original did for fc layers. Its deconv is the backward pass of the live view's back
mode seeded, as the original's max_deconv, with a one-hot 1.0 at (channel, y, x) of that image,
cropped the same way and shown with grey at zero and a symmetric scale per patch (the original's
norm01c, scaled to the 99th percentile of |value| so that a few extreme pixels do not flatten the
rest to grey). Montages are near-square grids, 3x3 for k=9.

Which back mode: ``auto`` is deconv for models with max-pooling (CaffeNet, as the original) and
guided backprop for the others. A deconvnet ignores the forward ReLU masks, so without max-pooling
switches its backward pass does not depend on the image at all: on EfficientNet every patch of a
unit gets the identical deconv image. Guided backprop keeps the masks and shows what in each patch
the unit responded to.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image

from ..backprop import MODES
from ..errors import DeepvisError
from ..files import image_file_ok, remove_stale_partials_below
from ..images import save_image
from ..numerics import percentile_lerp, percentile_ranks
from ..progress import progress as progress_bar
from .corpus import BatchDecoder, load_items
from .field_backprop import field_backprop, field_backprop_holds
from .seeded_backprop import shared_backprop
from .receptive import crop_box, layer_geometry
from .store import AtlasStore


PAD = 2
PAD_COLOR = 40


class ViewCache:
    """Decoded network views of corpus items, least recently used dropped first."""

    def __init__(self, items: list[str], view: dict, size: int = 512):
        self.items, self.decoder, self.size = items, BatchDecoder(view), size
        self._cache: OrderedDict[int, np.ndarray | None] = OrderedDict()

    def get_many(self, ids) -> list[np.ndarray | None]:
        missing = sorted({int(i) for i in ids if int(i) >= 0 and int(i) not in self._cache})
        if missing:
            for i, img in zip(missing, load_items([self.items[i] for i in missing])):
                self._cache[i] = None if isinstance(img, Exception) else self.decoder.fit(img)
        out = []
        for i in ids:
            i = int(i)
            if i < 0:
                out.append(None)
                continue
            self._cache.move_to_end(i)
            out.append(self._cache[i])
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return out


def has_max_pooling(module) -> bool:
    """Max-pooling modules (torch's, or a Caffe MAX pooling layer) anywhere in the model."""
    from torch import nn

    pools = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
    return any(isinstance(m, pools) or (type(m).__name__ == "Pool" and getattr(m, "max", False))
               for m in module.modules())


def resolve_mode(backend, mode: str) -> str:
    if mode == "auto":
        return "deconv" if has_max_pooling(backend.module) else "guided"
    if mode not in MODES or mode == "off":
        raise DeepvisError(f"deconv mode must be auto, {', '.join(m for m in MODES if m != 'off')}; got '{mode}'")
    return mode


def _order_stats(v: np.ndarray, ranks: list[int]) -> np.ndarray:
    """The values of the given ranks (0-based, ascending) in v (no NaN), as np.partition gives them.
    For high ranks (a 99th percentile) only the candidates above a bound guessed from every
    16th value are partitioned: the same values, ~3x faster than partitioning all of v; a bound
    that turns out too high (too many values under it) falls back to the whole array."""
    low = min(ranks)
    if v.size >= 4096 and low >= v.size // 2:
        sample = v[::16]
        # a little below the sample's own quantile, so that it almost surely lies under rank `low`
        guess = max(0, int(sample.size * low / v.size) - 8 - sample.size // 100)
        bound = np.partition(sample, guess)[guess]
        cand = v[v >= bound]
        below = v.size - cand.size  # how many values lie under the bound
        if below <= low:
            shifted = [r - below for r in ranks]
            return np.partition(cand, shifted)[shifted]
    return np.partition(v, ranks)[ranks]


def abs_percentile(a: np.ndarray, pct: float) -> float:
    """np.percentile(|a|, pct) (linear interpolation, numpy's own lerp formula), the same value,
    from the two order statistics it needs, found in float32 (no float64 copy, and for high
    percentiles no partition of the whole array): about a quarter of np.percentile's time on
    a 224x224x3 gradient."""
    v = np.abs(a, dtype=np.float32).ravel()
    if np.isnan(v.max()):  # as numpy (the shortcut below would not count a NaN)
        return float("nan")
    lo, hi, t = percentile_ranks(v.size, pct)
    x, y = (float(u) for u in _order_stats(v, [lo, hi]))
    return percentile_lerp(x, y, t)


def render_signed(patch: np.ndarray, pct: float = 99.0) -> np.ndarray:
    """A signed HxWx3 array as uint8: grey at zero, +-(99th percentile of |value|) at 255 / 0.
    In float32 (gradients are float32; a float64 copy changed at most a rounding, at 2x the time)."""
    a = np.asarray(patch, np.float32)
    m = abs_percentile(a, pct) if a.size else 0.0
    if np.isnan(m):  # a NaN in the gradient (a broken model): drawn as zero, the rest still shown
        a = np.nan_to_num(a, nan=0.0)
        m = abs_percentile(a, pct)
    m = np.float32(m)  # divided by, not multiplied by 127.5 / m: that overflows for a tiny m
    if m <= 0:
        m = np.abs(a).max() if a.size else np.float32(0)
    if m <= 0:
        return np.full(a.shape, 128, np.uint8)
    out = a / m
    out *= np.float32(127.5)
    out += np.float32(127.5)
    return np.clip(np.round(out, out=out), 0, 255, out=out).astype(np.uint8)


def display_box(geometry, y: int, x: int, input_size) -> tuple[int, int, int, int]:
    """The unit's field, or the whole input where the field covers more than all of it."""
    H, W = input_size
    if geometry.whole or (geometry.size_y >= H and geometry.size_x >= W):
        return 0, 0, H, W
    return geometry.box(y, x)


MARK_COLOR = (255, 200, 40)


def token_marks(backend, layer, geometry, positions, tile) -> list | None:
    """Where a token layer's field is the whole image (after attention), the montage shows whole
    images: the unit's own patch, (y, x) of the patch grid, is marked on each tile, as a box in
    tile pixels. None for other layers (their tiles are the field itself)."""
    layout = backend.layer_layout(layer)
    if not (geometry.whole and layout.kind == "tokens" and layout.grid):
        return None
    H, W = backend.input_size
    gh, gw = layout.grid
    s = tile / max(H, W)
    top, left = (tile - round(H * s)) // 2, (tile - round(W * s)) // 2
    return [(top + int(y * H / gh * s), left + int(x * W / gw * s),
             top + int((y + 1) * H / gh * s), left + int((x + 1) * W / gw * s)) if y < gh else None
            for y, x in positions]  # row gh: a prefix token (class, ...), which has no patch to mark


def mark(tile_img: np.ndarray, box) -> np.ndarray:
    """A copy of the tile with the box outlined, 2 px wide inside it (the token's patch; JPEG's
    colour subsampling would smear a 1-px line); None: the tile as it is."""
    if box is None:
        return tile_img
    out = tile_img.copy()
    t, l, b, r = box
    b, r = max(b, t + 4), max(r, l + 4)
    out[t:b, [l, l + 1, r - 2, r - 1]] = MARK_COLOR
    out[[t, t + 1, b - 2, b - 1], l:r] = MARK_COLOR
    return out


def overlay(back: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """The back image over the photo in grey (half each), so what it points at has a place."""
    grey = photo.astype(np.float32).mean(2, keepdims=True)
    return np.clip(0.5 * back.astype(np.float32) + 0.5 * grey, 0, 255).astype(np.uint8)


def fit_tile(patch: np.ndarray, tile: int) -> np.ndarray:
    """A patch scaled to fit a tile x tile square (nearest neighbour when enlarging a lot, so
    the pixels of a small field stay visible), centred on the pad colour."""
    h, w = patch.shape[:2]
    s = tile / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    resample = Image.NEAREST if s >= 2 else Image.BILINEAR
    img = np.asarray(Image.fromarray(patch).resize((nw, nh), resample))
    out = np.full((tile, tile, 3), PAD_COLOR, np.uint8)
    t, l = (tile - nh) // 2, (tile - nw) // 2
    out[t:t + nh, l:l + nw] = img
    return out


def montage(tiles: list[np.ndarray | None], tile: int, cols: int | None = None) -> np.ndarray:
    """Tiles in a near-square grid (3x3 for 9), a thin dark border between; None is black."""
    n = max(1, len(tiles))
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (tile + PAD) + PAD, cols * (tile + PAD) + PAD, 3), PAD_COLOR, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = PAD + r * (tile + PAD), PAD + c * (tile + PAD)
        out[y:y + tile, x:x + tile] = 0 if t is None else t
    return out


def default_tile(geometry, input_size, largest: int = 128, smallest: int = 64) -> int:
    h, w = input_size
    size = max(h, w) if geometry.whole else max(geometry.size_y, geometry.size_x)
    return int(min(largest, max(smallest, size)))


def montage_batch(device) -> int:
    """Images per forward pass in montages. On a CPU 4: at 8 the embedded model's largest
    tensors (8x96x112x112 floats, 38.5 MB) exceed what glibc serves from the heap (32 MB, see
    allocator.py), and every one is mapped and faulted in anew: 4 images went 1.2x faster in
    the montage benchmark, 2 slower again (reference machine). On a GPU (a caching allocator) 8,
    the former default, not measured against others."""
    return 8 if torch.device(device).type == "cuda" else 4


def render_montages(backend, atlas_dir, layers=None, units=None, mode: str = "auto", tile: int | None = None,
                    batch_size: int | None = None, progress: bool = True, units_per_chunk: int = 128,
                    numerics: str = "default") -> dict:
    """Write max_im / max_deconv (and min_im with negatives) montages for every unit of the mined
    layers (or the given ones). Units whose files exist are skipped: an interrupted run resumes.
    The units of a chunk share their images' forward passes (``shared_backprop``, ``batch_size``
    images at a time), and JPEGs are encoded by a writer thread while the next chunk computes.
    numerics: the backward passes' (deepvis_repro/numerics.py; deepvis-mine passes its own).
    batch_size: images per forward pass, None for ``montage_batch``. Returns {layer: units written}."""
    with AtlasStore(atlas_dir).writer():  # one writer: two runs would both write every montage
        return _render_montages(backend, atlas_dir, layers, units, mode, tile, batch_size, progress,
                                units_per_chunk, numerics)


def _render_montages(backend, atlas_dir, layers, units, mode, tile, batch_size, progress, units_per_chunk,
                     numerics) -> dict:
    mode = resolve_mode(backend, mode)
    batch_size = int(batch_size or montage_batch(backend.device))
    store = AtlasStore(atlas_dir)
    # a killed montage phase leaves its JPEG temporaries in max_im/<layer>/...: gone before resuming
    for kind in ("max_im", "max_deconv", "min_im"):
        remove_stale_partials_below(store.path(kind))
    manifest = store.manifest()
    if manifest is None or "layers" not in manifest:
        raise DeepvisError(f"{store.root} holds no finished mining: run deepvis-mine first")
    if manifest.get("mining", {}).get("backend", {}).get("name") != backend.name:
        raise DeepvisError(f"atlas {store.root} was mined with backend "
                           f"{manifest.get('mining', {}).get('backend', {}).get('name')}, not {backend.name}")
    mined = list(manifest["layers"])
    layers = mined if layers in (None, "all") else [backend.resolve_layer(l) for l in layers]
    for l in layers:
        if l not in mined:
            raise DeepvisError(f"layer {l} was not mined in {store.root}; mined: {', '.join(mined)}")
    cache = ViewCache(store.corpus(), backend.view_spec())
    written = {}
    with _Writer() as writer:
        for layer in layers:
            arrays = store.layer_arrays(layer)
            geometry = layer_geometry(backend, layer)
            t = int(tile or default_tile(geometry, backend.input_size))
            channels = arrays["values"].shape[0]
            todo = [u for u in (range(channels) if units is None else units) if 0 <= int(u) < channels]
            sides = [("max_im", "max_deconv", "")] + ([("min_im", None, "min_")] if "min_values" in arrays else [])
            # done: every file there and whole (a truncated one, from a crash, is made again)
            todo = [u for u in todo if not all(image_file_ok(store.unit_file(k, layer, u)) for s in sides
                                               for k in s[:2] if k)]
            bar = progress_bar(total=len(todo), desc=f"montages {layer}", unit="unit", enabled=progress)
            how = None
            for start in range(0, len(todo), units_per_chunk):
                chunk = todo[start:start + units_per_chunk]
                for im_kind, deconv_kind, prefix in sides:
                    how = _render_chunk(backend, store, cache, layer, geometry, arrays, chunk, t, mode, batch_size,
                                        im_kind, deconv_kind, prefix, writer, numerics) or how
                bar.update(len(chunk))
            writer.wait()  # the layer's files on disk before the manifest says it has montages
            bar.close()
            written[layer] = len(todo)
            manifest = store.manifest()
            manifest["layers"][layer].update(receptive_field=geometry.as_dict(), tile=t)
            entry = manifest.setdefault("montages", {}).setdefault(layer, {})
            entry.update(mode=mode, tile=t)
            if how:  # how the deconvs were computed: on each unit's field, or on the whole image (and why)
                entry["backprop"] = how
            manifest.pop("format", None)
            store.write_manifest(manifest)
    return written


class _Writer:
    """One thread that writes the montages, in the order given (a unit's max_im after its
    max_deconv: its presence still means both are done); PIL's JPEG encoder releases the GIL, so
    encoding overlaps the next chunk's backward passes. A failed write (a full disk) is raised in
    the caller at the next wait, and the writes queued after it are skipped."""

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.pending, self.failed = ThreadPoolExecutor(1, thread_name_prefix="montage-writer"), [], False
        return self

    def _write(self, path, image):
        if self.failed:
            return
        try:
            save_image(path, image)
        except BaseException:
            self.failed = True
            raise

    def save(self, path, image):
        self.pending.append(self.pool.submit(self._write, path, image))
        if len(self.pending) > 256:  # bounded: the computing side may not run far ahead
            self.wait(keep=64)

    def wait(self, keep: int = 0):
        while len(self.pending) > keep:
            self.pending.pop(0).result()

    def __exit__(self, kind, *_):
        if kind is not None:  # an error or Ctrl-C: what was queued is dropped, not written
            for f in self.pending:
                f.cancel()
        self.pool.shutdown(wait=True)
        if kind is None:
            self.wait()
        return False


def _render_chunk(backend, store, cache, layer, geometry, arrays, units, tile, mode, batch_size,
                  im_kind, deconv_kind, prefix, writer, numerics) -> str | None:
    """One chunk of units' montages queued on the writer; returns how the deconvs were computed
    ('field', or 'whole image: why'), None where this side has none."""
    ids = arrays[f"{prefix}image_ids"][units]        # (U, k)
    pos = arrays[f"{prefix}positions"][units]        # (U, k, 2)
    k = ids.shape[1]
    flat_ids = ids.reshape(-1)
    flat_pos = pos.reshape(-1, 2)
    views = cache.get_many(flat_ids)
    boxes = [display_box(geometry, y, x, backend.input_size) for y, x in flat_pos]
    marks = token_marks(backend, layer, geometry, flat_pos, tile)
    # an image in several units' lists, with the same box (always, where the field is the whole
    # input: fc, deep layers), is cut and scaled once
    cut: dict[tuple, np.ndarray] = {}
    patches = []
    for j, (i, v, b) in enumerate(zip(flat_ids, views, boxes)):
        key = (int(i), tuple(int(c) for c in b))
        if v is not None and key not in cut:
            cut[key] = fit_tile(crop_box(v, b), tile)
        patches.append(None if v is None else mark(cut[key], marks[j]) if marks else cut[key])
    deconvs: list = [None] * len(views)
    how = None
    if deconv_kind:
        have = [i for i, v in enumerate(views) if v is not None]
        chans = np.repeat(np.asarray(units), k)
        by_id = {int(flat_ids[i]): views[i] for i in have}

        def tile_of(j, g, at=(0, 0)):
            i = have[j]
            t, l, b, r = boxes[i]  # g covers the input from `at` on: the box in its pixels
            back = fit_tile(render_signed(crop_box(g, (t - at[0], l - at[1], b - at[0], r - at[1]))), tile)
            if marks:  # a token's field is the whole image: its back image over the photo, its patch marked
                back = mark(overlay(back, fit_tile(crop_box(views[i], boxes[i]), tile)), marks[i])
            deconvs[i] = back

        pairs = [(int(flat_ids[i]), int(chans[i]), tuple(int(p) for p in flat_pos[i])) for i in have]
        how = field_backprop_holds(backend, layer, geometry, mode) if pairs else None
        if how == "field":
            field_backprop(backend, by_id, pairs, layer, geometry, tile_of, mode, numerics,
                           pixels=batch_size * backend.input_size[0] * backend.input_size[1])
        elif pairs:
            shared_backprop(backend, by_id, pairs, layer, tile_of, mode, images=batch_size, numerics=numerics)
    for u_i, u in enumerate(units):
        part = slice(u_i * k, (u_i + 1) * k)
        path = store.unit_file(im_kind, layer, u)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if deconv_kind:
            dpath = store.unit_file(deconv_kind, layer, u)
            os.makedirs(os.path.dirname(dpath), exist_ok=True)
            writer.save(dpath, montage(deconvs[part], tile))
        writer.save(path, montage(patches[part], tile))  # last: its presence means both are done
    return how
