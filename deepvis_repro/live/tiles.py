"""Tiling a layer's channels into one near-square grid image, with the original's per-layer
normalization and its two boosts (per-channel 'indiv' boost and gamma)."""
from __future__ import annotations

import math

import numpy as np


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid for n tiles: cols = ceil(sqrt(n))."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return max(1, math.ceil(n / cols)), cols


def normalize_layer(acts: np.ndarray, boost_indiv: float = 0.0, gamma: float = 1.0) -> np.ndarray:
    """(C,H,W) or (C,) activations -> (C,H,W) floats in 0..1. The whole layer shares one min-max
    range; boost_indiv in 0..1 divides each channel by its own max to that power first, so weak
    channels show up; gamma < 1 brightens."""
    a = np.asarray(acts, dtype=np.float32)
    if a.ndim == 1:
        a = a[:, None, None]
    a = np.nan_to_num(a)
    if boost_indiv > 0:
        peak = np.abs(a).reshape(len(a), -1).max(1).reshape(-1, 1, 1)
        a = a / np.maximum(peak, 1e-8) ** boost_indiv
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a ** gamma if gamma != 1.0 else a


def tile_layer(acts: np.ndarray, boost_indiv: float = 0.0, gamma: float = 1.0, pad: int = 1):
    """Tile all channels: returns (grid HxW uint8, (rows, cols), tile (h, w)). Padding is
    mid-grey so black tiles stay distinguishable."""
    a = normalize_layer(acts, boost_indiv, gamma)
    c, h, w = a.shape
    rows, cols = grid_shape(c)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 80, np.uint8)
    tiles = (a * 255 + 0.5).astype(np.uint8)
    for i in range(c):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y:y + h, x:x + w] = tiles[i]
    return out, (rows, cols), (h, w)
