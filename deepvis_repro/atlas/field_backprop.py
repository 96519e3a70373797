"""A unit's input-space backward pass computed on its receptive field alone.

The deconv of a convolutional unit is zero outside its receptive field, and inside it depends
only on the pixels there: so the forward and backward pass can run on a crop of the image that
holds the field, instead of the whole input. The crop starts on a multiple of the layer's stride
(the network's grids then line up with the full image's: unit (y, x) is unit (y - top / stride,
x - left / stride) of the crop) and is cut at the image's own edges (so the padding there is the
padding the full image gets). Every crop of a layer has the same size away from the borders,
so many units' crops go forward as one batch and back with one seed each, in one backward pass:
on a 320 px VGG's conv3 (a 40 px field) that is one small pass for 64 patches instead of a
full-image backward pass per patch (benchmarks/bench_montage_wide.py).

That holds for networks made of local, translation-equivariant layers. Whether a layer is one is
not assumed but checked, once per layer, against the full-image pass (``shared_backprop``) on
real patches and on the map's corner units (where padding differs): a model that pads by its
input's size (TensorFlow's SAME computed at run time), mixes positions globally (squeeze-excite,
attention) or accepts one input size only falls back to the full image, said nowhere but in the
manifest (``montages[layer].backprop``)."""
from __future__ import annotations

import numpy as np
import torch

from ..backprop import relu_backward
from ..numerics import Numerics
from .seeded_backprop import rgb_numpy, shared_backprop


#: a crop must cover less than this share of the input for the crop path to be tried: a field
#: nearly as large as the image gains nothing and loses the shared forward pass
MAX_SHARE = 0.5


def field_extent(geometry, input_size) -> tuple[int, int] | None:
    """The crop's size (rows, columns) away from the borders: the field plus what aligning its
    start to the stride adds, rounded to whole strides; None where the layer is not for crops
    (a whole-image or clipped field, or one as large as the input). A field found as the box of
    several units' fields (TensorFlow's padding, upsampling: 'probe, N units') is tried too: the
    check below decides whether its crops line up."""
    g = geometry
    if g.whole or g.clipped or not g.method.startswith("probe") or g.stride_y < 1 or g.stride_x < 1:
        return None
    H, W = input_size
    hy = -(-(g.size_y + g.stride_y - 1) // g.stride_y) * g.stride_y
    hx = -(-(g.size_x + g.stride_x - 1) // g.stride_x) * g.stride_x
    if hy * hx >= MAX_SHARE * H * W:
        return None
    return hy, hx


def crop_origin(geometry, extent, input_size, y: int, x: int) -> tuple[int, int, int, int]:
    """Unit (y, x)'s crop (top, left, bottom, right) in input pixels: starts at the field's start
    rounded down to a whole stride (not before the image), ends at the extent or the image's edge."""
    g, (H, W) = geometry, input_size
    t, l, _, _ = g.box(y, x)
    top = max(0, (t // g.stride_y) * g.stride_y)
    left = max(0, (l // g.stride_x) * g.stride_x)
    return top, left, min(H, top + extent[0]), min(W, left + extent[1])


def field_backprop(backend, views: dict, pairs: list, layer: str, geometry, on_grad, mode: str = "deconv",
                   numerics: str = "default", pixels: int | None = None) -> None:
    """As ``shared_backprop`` (the same pairs, the same seeds), each pair's pass on its crop:
    calls on_grad(index into pairs, (h, w, 3) float32 gradient of the crop, (top, left) of the crop
    in the input). Pairs whose crops have the same size go together, up to ``pixels`` input pixels
    per pass (default: four full inputs'), sorted by image so that a pass converts few images."""
    H, W = backend.input_size
    extent = field_extent(geometry, (H, W))
    if extent is None:
        raise ValueError(f"layer {layer}: its field is not for crops (field_extent)")
    pixels = int(pixels or 4 * H * W)
    boxes = [crop_origin(geometry, extent, (H, W), y, x) for _, _, (y, x) in pairs]
    groups: dict[tuple, list[int]] = {}
    for k, (t, l, b, r) in enumerate(boxes):
        groups.setdefault((b - t, r - l), []).append(k)
    with torch.enable_grad(), relu_backward(backend.module, mode), Numerics(numerics).active(backend.device):
        for (h, w), members in groups.items():
            members.sort(key=lambda k: int(pairs[k][0]))
            per = max(1, min(256, pixels // (h * w)))
            for start in range(0, len(members), per):
                part = members[start:start + per]
                ids = sorted({int(pairs[k][0]) for k in part})
                full = backend.views_to_x(torch.from_numpy(np.stack([views[i] for i in ids])))
                row = {i: n for n, i in enumerate(ids)}
                x = torch.stack([full[row[int(pairs[k][0])], :, boxes[k][0]:boxes[k][2], boxes[k][1]:boxes[k][3]]
                                 for k in part]).detach().requires_grad_(True)
                del full
                a = backend.forward(x, [layer])[layer]
                seed = torch.zeros_like(a)
                for m, k in enumerate(part):
                    _, c, (y, xx) = pairs[k]
                    t, l = boxes[k][:2]
                    seed[m, int(c), int(y) - t // geometry.stride_y, int(xx) - l // geometry.stride_x] = 1.0
                (g,) = torch.autograd.grad(a, x, grad_outputs=seed, allow_unused=True)
                g = rgb_numpy(g, x)
                for m, k in enumerate(part):
                    on_grad(k, g[m], boxes[k][:2])


def field_backprop_holds(backend, layer: str, geometry, mode: str) -> str:
    """Whether the crop path gives the full image's gradients on this layer (cached per layer and
    mode): 'field' or why not ('whole image: ...'). Checked on an image of uniform noise (a
    photo's flat regions make max-pooling switches between equal values, which float rounding
    decides differently on another size: that is not what is checked), at the map's centre,
    its four corners (where padding differs) and an edge unit, each on its most active channel; equal when the relative L2 difference is under 1e-3 (measured: 1e-6 where crops line
    up, of the order of 1 where they do not). Always in float32: it checks geometry, not
    numerics."""
    H, W = backend.input_size
    if field_extent(geometry, (H, W)) is None:
        g = geometry
        why = ("the field covers the input" if g.whole else "the field was clipped" if g.clipped
               else "a crop would cover half the input or more")
        return f"whole image: {why}"
    cache = backend.cache("field_backprop")
    if (layer, mode) in cache:
        return cache[(layer, mode)]
    noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    views = {0: noise}
    # at each checked position the channel most active there: one that is on, so that guided
    # backprop (which stops at units that are off) has a gradient to compare
    a = _activation(backend, layer, noise)
    h, w = int(a.shape[-2]), int(a.shape[-1])
    spots = ((h // 2, w // 2), (0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 3, 0))
    check = [(0, int(a[0, :, y, x].argmax()), (y, x)) for y, x in spots]
    full: dict[int, np.ndarray] = {}
    shared_backprop(backend, views, check, layer, lambda k, g: full.__setitem__(k, g.copy()), mode, images=1)
    crop: dict[int, tuple] = {}
    try:
        field_backprop(backend, views, check, layer, geometry, lambda k, g, at: crop.__setitem__(k, (g.copy(), at)),
                       mode)
    except Exception as e:  # a model that takes one input size only
        cache[(layer, mode)] = f"whole image: the model refused a crop ({type(e).__name__})"
        return cache[(layer, mode)]
    verdict, seen = "field", False
    for k, g in full.items():
        pasted = np.zeros_like(g)
        c, (t, l) = crop[k]
        pasted[t:t + c.shape[0], l:l + c.shape[1]] = c
        norm = float(np.linalg.norm(g))
        seen |= norm > 0
        if np.linalg.norm(pasted - g) > 1e-3 * norm:
            verdict = "whole image: a crop's gradients differ from the full image's (position-dependent layers)"
            break
    if verdict == "field" and not seen:
        verdict = "whole image: no checked unit had a gradient to compare"
    cache[(layer, mode)] = verdict
    return verdict


def _activation(backend, layer, view) -> torch.Tensor:
    with torch.no_grad():
        return backend.forward(backend.views_to_x(torch.from_numpy(view[None])), [layer])[layer].float()
