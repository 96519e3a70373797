"""The miner: one decoded batch -> per layer the batch's own top k. Below both the mining loop
(mining.py), which merges the batches, and the engines (engine.py), which run miners locally or
on Ray."""
from __future__ import annotations

import numpy as np
import torch

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

    def __call__(self, images, ids, ok) -> dict:
        b = self.backend
        x = b.views_to_x(torch.as_tensor(images))
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
        ok = torch.as_tensor(np.asarray(ok), dtype=torch.bool)
        sides = [("top", True)] + ([("bottom", False)] if self.negatives else [])
        out = {}

        def reduce(layer, a):
            out[layer] = {side: batch_top(a, ids, ok, self.k, largest=largest) for side, largest in sides}

        with torch.no_grad(), self.numerics.active(b.device):
            b.stream(x, self.layers, reduce)  # a HookBackend reduces each layer in its hook: one held at a time
        return out
