"""The unit pane's pictures, read off the drawing thread.

For the selected unit: its optimized image, the montage of its top-9 patches and of their deconv
(the original's jpgvis pane), from an atlas folder (ours, or the original toolbox's unit_jpg_vis).
A background thread serves the newest request first (a cursor moving fast never queues up stale
reads), decodes and scales each picture to its slot, and keeps a bounded LRU cache; the drawing
thread only ever asks "is it there yet?". Pattern mode's grid (every unit's optimized image of a
layer) is built the same way, as one sprite.
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image

from ..atlas.patches import PAD, fit_tile, montage
from ..atlas.store import AtlasReader
from ..images import stretched

#: Slots of the pane, top to bottom, and their captions ({k}: the atlas's images per unit; {mode}:
#: its back mode).
SLOTS = (("regularized_opt", "optimized (contrast-stretched)"), ("max_im", "top {k}"),
         ("max_deconv", "{mode} of the top {k}"))


def read_picture(path: str, quadrant: bool, size: tuple[int, int]) -> np.ndarray | None:
    """A picture scaled to fit size (w, h), or None when the file is absent or unreadable
    (shown as missing, never an error). quadrant: the original's montage, whose bottom-left
    quarter is the pane's image."""
    if not os.path.isfile(path):
        return None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if quadrant:
                w, h = im.size
                im = im.crop((0, h // 2, w // 2, h))
            w, h = im.size
            s = min(size[0] / w, size[1] / h)  # fit the slot, enlarging small pictures too
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
            return np.asarray(im).copy()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


class PaneLoader(threading.Thread):
    def __init__(self, reader: AtlasReader, slot_size: tuple[int, int], cache_units: int = 96):
        super().__init__(daemon=True, name="pane-loader")
        self.reader, self.slot_size, self.cache_units = reader, tuple(slot_size), cache_units
        self.cond = threading.Condition()
        self.cache: OrderedDict = OrderedDict()       # (layer, unit) -> {kind: array | None}
        self.sprites: dict = {}                       # (layer, tile) -> (array, layout)
        self.wanted: tuple | None = None
        self.wanted_sprite: tuple | None = None
        self.stop = threading.Event()
        self.loads = 0

    # ----- the drawing thread's side (never blocks on a file) ------------------------------------
    def want(self, layer: str, unit: int):
        with self.cond:
            if (layer, unit) not in self.cache and self.wanted != (layer, unit):
                self.wanted = (layer, unit)
                self.cond.notify()

    def get(self, layer: str, unit: int) -> dict | None:
        with self.cond:
            entry = self.cache.get((layer, unit))
            if entry is not None:
                self.cache.move_to_end((layer, unit))
            return entry

    def want_sprite(self, layer: str, channels: int, tile: int):
        with self.cond:
            if (layer, tile) not in self.sprites and self.wanted_sprite != (layer, channels, tile):
                self.wanted_sprite = (layer, channels, tile)
                self.cond.notify()

    def sprite(self, layer: str, tile: int):
        with self.cond:
            return self.sprites.get((layer, tile))

    def invalidate(self, layer: str, unit: int):
        """A picture of this unit changed (an on-demand image was written): read it again."""
        with self.cond:
            self.cache.pop((layer, unit), None)
            for key in [k for k in self.sprites if k[0] == layer]:
                del self.sprites[key]

    @property
    def idle(self) -> bool:
        with self.cond:
            return self.wanted is None and self.wanted_sprite is None

    # ----- the loader's side ---------------------------------------------------------------------
    def run(self):
        while not self.stop.is_set():
            with self.cond:
                while self.wanted is None and self.wanted_sprite is None and not self.stop.is_set():
                    self.cond.wait(0.2)
                unit_job, sprite_job = self.wanted, self.wanted_sprite
            if unit_job is not None:  # the selected unit before the (slower) whole-layer sprite
                self._serve(unit_job)
                continue
            if sprite_job is not None:
                layer, channels, tile = sprite_job
                sprite = self.load_sprite(layer, channels, tile)
                with self.cond:
                    self.sprites[(layer, tile)] = sprite
                    if self.wanted_sprite == sprite_job:
                        self.wanted_sprite = None

    def _serve(self, job: tuple):
        """Load a unit's pictures into the bounded cache."""
        entry = self.load_unit(*job)
        with self.cond:
            self.cache[job] = entry
            while len(self.cache) > self.cache_units:
                self.cache.popitem(last=False)
            if self.wanted == job:
                self.wanted = None

    def _optimized(self, layer: str, unit: int, size: tuple[int, int]) -> np.ndarray | None:
        """A unit's optimized image, stretched for display (an original atlas's montage
        quadrant, or an on-demand image written beside it)."""
        path, quadrant = self.reader.files(layer, unit)["regularized_opt"]
        img = read_picture(path, quadrant, size)
        if img is None and quadrant:
            img = read_picture(path.replace("_montage.jpg", ".jpg"), False, size)
        return None if img is None else stretched(img)

    def load_unit(self, layer: str, unit: int) -> dict:
        files = self.reader.files(layer, unit)
        out = {kind: self._optimized(layer, unit, self.slot_size) if kind == "regularized_opt"
               else read_picture(*files[kind], self.slot_size) for kind, _ in SLOTS}
        self.loads += 1
        return out

    def load_sprite(self, layer: str, channels: int, tile: int):
        """Every unit's optimized image in a near-square grid of tile px squares (the atlas's
        montage layout): (image, (rows, cols, tile, pad), units found)."""
        tiles = []
        for c in range(channels):
            if self.stop.is_set():
                break
            with self.cond:
                job = self.wanted
            if job is not None:  # the user moved: serve the pane first, then go on
                self._serve(job)
            img = self._optimized(layer, c, (tile, tile))
            tiles.append(None if img is None else fit_tile(img, tile))
        found = sum(t is not None for t in tiles)
        cols = max(1, math.ceil(math.sqrt(channels)))
        sprite = montage(tiles, tile, cols)
        whole = self.reader.whole_layer(layer)
        if not found and os.path.isfile(whole):  # an old atlas with only the layer's sprite
            img = read_picture(whole, False, (sprite.shape[1], sprite.shape[0]))
            if img is not None:
                return img, None, channels
        return sprite, (math.ceil(channels / cols), cols, tile, PAD), found
