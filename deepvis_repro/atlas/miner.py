"""The miner: one decoded batch -> per layer the batch's own top k. Below both the mining loop
(mining.py), which merges the batches, and the engines (engine.py), which run miners locally or
on Ray."""
from __future__ import annotations

import numpy as np
import torch

from ..layout import PREFIX
from ..numerics import Numerics
from .topk import batch_top


class Miner:
    """Holds the backend: one decoded batch -> per layer the batch's own top k (what the driver
    merges, locally or from a remote worker)."""

    def __init__(self, backend, layers, k: int, negatives: bool = False, numerics: str = "default"):
        self.backend, self.layers, self.k = backend, list(layers), int(k)
        self.numerics = Numerics(numerics)
        self.negatives = bool(negatives)
        backend.check_images()
        self.with_prefix = [l for l in self.layers if mines_prefix(backend, l)]

    def __call__(self, images, ids, ok) -> dict:
        b = self.backend
        x = b.views_to_x(torch.as_tensor(images))
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
        ok = torch.as_tensor(np.asarray(ok), dtype=torch.bool)
        sides = [("top", True)] + ([("bottom", False)] if self.negatives else [])
        out = {}

        held = {}

        def reduce(layer, a):
            if layer.endswith(PREFIX):
                held[layer[:-len(PREFIX)]] = a
                return
            if layer in held:
                a = with_prefix_row(a, held.pop(layer))
            out[layer] = {side: batch_top(a, ids, ok, self.k, largest=largest) for side, largest in sides}

        with torch.no_grad(), self.numerics.active(b.device):
            # a HookBackend reduces each layer in its hook: one held at a time
            b.stream(x, self.layers + [l + PREFIX for l in self.with_prefix], reduce)
        return out


def mines_prefix(backend, layer: str) -> bool:
    """A token layer's prefix tokens (class, distillation, registers) are mined beside its patch
    grid, as one more row of the map (row H, one token per column), where they fit in a row."""
    lay = backend.layer_layout(layer)
    return lay.kind == "tokens" and bool(lay.prefix) and lay.grid is not None and len(lay.prefix) <= lay.grid[1]


def with_prefix_row(a: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) and (B, C, P) -> (B, C, H + 1, W): row H holds the P prefix tokens, its other
    columns repeat the first (a repeat can neither win a max or min nor come first in row-major
    order, so a position (H, p) is prefix token p)."""
    b, c, h, w = a.shape
    p = prefix.shape[-1]
    row = torch.cat([prefix, prefix[..., :1].expand(b, c, w - p)], -1) if w > p else prefix
    return torch.cat([a, row.to(a.dtype).unsqueeze(2)], 2)
