"""The input-space backward pass of (image, unit) pairs over the whole image, each image's
forward pass shared by its pairs: the montages' exact path (atlas/patches.py), and the reference
the receptive-field path is checked against (atlas/field_backprop.py)."""
from __future__ import annotations

import numpy as np
import torch

from ..backprop import relu_backward
from ..layout import PREFIX
from ..numerics import Numerics
from .miner import mines_prefix


def shared_backprop(backend, views: dict, pairs: list, layer: str, on_grad, mode: str = "deconv",
                    images: int = 8, numerics: str = "default") -> None:
    """The input-space backward pass of each (image id, channel, (y, x)) pair, seeded with a
    one-hot 1.0 at the unit (the original's max_deconv), in RGB like the views (a grey model's: grey). Each image's forward
    pass shared by every pair that lists it: up to ``images`` distinct images go forward together,
    then their pairs go backward in rounds over the same graph (round r seeds each image's r-th
    pair; images are grouped by how many pairs they have, so that few seeds in a round are empty).
    A plain backward pass per round: autograd's batched one (is_grads_batched, vmap) measured
    slower per seed on CPU. Calls on_grad(index into pairs, (H, W, 3) float32 gradient) for each
    pair (the caller reduces it to a tile at once: a layer's gradients would not fit in memory)."""
    by_image: dict[int, list[int]] = {}
    for i, (img, _, _) in enumerate(pairs):
        by_image.setdefault(int(img), []).append(i)
    order = sorted(by_image, key=lambda i: (-len(by_image[i]), i))
    with torch.enable_grad(), relu_backward(backend.module, mode), Numerics(numerics).active(backend.device):
        for start in range(0, len(order), images):
            ids = order[start:start + images]
            x = backend.views_to_x(torch.from_numpy(np.stack([views[i] for i in ids])))
            x = x.detach().requires_grad_(True)
            depth = max(len(by_image[i]) for i in ids)
            # a position on row H of a token layer's map is prefix token x (miner.with_prefix_row)
            prefixed = None
            if mines_prefix(backend, layer):
                out = backend.forward(x, [layer, layer + PREFIX])
                a, prefixed = out[layer], out[layer + PREFIX]
            else:
                a = backend.forward(x, [layer])[layer]
            a_dim4 = a.dim() == 4
            for r in range(depth):
                seed = torch.zeros_like(a)
                pseed = None if prefixed is None else torch.zeros_like(prefixed)
                filled = []
                for m, img in enumerate(ids):
                    if r < len(by_image[img]):
                        k = by_image[img][r]
                        _, c, (y, xx) = pairs[k]
                        if a_dim4 and pseed is not None and int(y) >= a.shape[2]:
                            pseed[m, int(c), int(xx)] = 1.0
                        elif a_dim4:
                            seed[m, int(c), int(y), int(xx)] = 1.0
                        else:
                            seed[m].view(-1)[int(c)] = 1.0
                        filled.append((m, k))
                outs, seeds = ((a,), (seed,)) if prefixed is None else ((a, prefixed), (seed, pseed))
                (g,) = torch.autograd.grad(outs, x, grad_outputs=seeds, allow_unused=True, retain_graph=r + 1 < depth)
                g = rgb_numpy(g, x)
                for m, k in filled:
                    on_grad(k, g[m])


def rgb_numpy(g: torch.Tensor | None, x: torch.Tensor) -> np.ndarray:
    """An input gradient (N,C,H,W) as the (N,H,W,3) float32 numpy the tiles are made from: zeros
    where autograd returned None (the layer does not depend on the input), a grey model's shown grey."""
    g = torch.zeros_like(x) if g is None else g.detach()
    g = g.expand(-1, 3, -1, -1) if g.shape[1] == 1 else g
    return g.permute(0, 2, 3, 1).float().cpu().numpy()
