"""Receptive fields computed from the model, for any backend (branching graphs included).

The input region a unit sees is the support of the gradient of that unit with respect to the
input, once nothing in the backward pass can hide it: ReLU-like functions and clamps pass the
gradient straight through, max-pooling spreads it over its whole window (as average pooling
does), and convolutions, linear layers and batch norms use the absolute value of their weights
so that no sum of paths can cancel to zero. Dead units therefore still show their full field.

It is computed once per layer on a zero image (plus a margin, so a large field is not cut by the
image's border) for one unit near the centre and its diagonal neighbour: their boxes give the
field's size and the layer's stride, and every other unit's box is a shift of the first. On
CaffeNet this gives the analytic AlexNet values (conv1 11, pool1 19, conv2 51, pool2 67, conv3 99,
conv4 131, conv5 163, pool5 195 pixels; tests/test_atlas.py). Layers without a spatial map (fc,
global pooling) see the whole input.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import DeepvisError
from ..units import layer_shapes


STRAIGHT = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu",
            "elu_", "selu", "celu", "gelu", "silu", "hardswish", "hardsigmoid", "mish", "clamp",
            "clip", "clamp_", "clamp_min", "clamp_max", "threshold", "sigmoid", "tanh", "softplus",
            "rrelu", "prelu"}
POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _named(args, kwargs, names):
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


class SupportMode(TorchFunctionMode):
    """Within the block, the backward pass of a network reaches every input pixel that some
    path connects to the output (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in STRAIGHT and args and isinstance(args[0], torch.Tensor):
            kwargs.pop("inplace", None)
            fn = getattr(torch, name.rstrip("_"), None) if name.endswith("_") else func
            x = args[0]
            y = (fn or func)(*args, **kwargs)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape or not y.is_floating_point():
                return y
            return x + (y - x).detach()  # forward: y; backward: the identity
        if name in ("max_pool2d", "max_pool1d", "max_pool3d"):
            a = _named(args, kwargs, POOL_ARGS)
            y = func(*args, **kwargs)
            if a.get("return_indices") or int(torch.tensor(a.get("dilation", 1) or 1).max()) != 1:
                return y
            dims = int(name[-2])
            avg = getattr(F, f"avg_pool{dims}d")(a["input"], a["kernel_size"], a.get("stride") or None,
                                                  a.get("padding", 0), bool(a.get("ceil_mode", False)),
                                                  count_include_pad=True)
            if avg.shape != y.shape:
                return y
            return avg + (y - avg).detach()  # forward: max; backward: spread over the window
        if name in ("adaptive_max_pool2d", "adaptive_max_pool1d"):
            a = _named(args, kwargs, ("input", "output_size", "return_indices"))
            y = func(*args, **kwargs)
            if a.get("return_indices"):
                return y
            avg = getattr(F, name.replace("max", "avg"))(a["input"], a["output_size"])
            return avg + (y - avg).detach()
        if name == "amax" and args and isinstance(args[0], torch.Tensor) and (len(args) > 1 or "dim" in kwargs):
            dim = args[1] if len(args) > 1 else kwargs["dim"]
            keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
            y = func(*args, **kwargs)
            avg = args[0].mean(dim=dim, keepdim=keep)
            return avg + (y - avg).detach()  # an elementwise max of branches reaches all of them
        if name in ("conv1d", "conv2d", "conv3d", "linear", "conv_transpose2d") and len(args) > 1:
            args = (args[0], args[1].abs()) + tuple(args[2:])
            return func(*args, **kwargs)
        if name == "batch_norm":
            a = _named(args, kwargs, ("input", "running_mean", "running_var", "weight", "bias"))
            if a.get("weight") is not None:
                if len(args) > 3:
                    args = tuple(args[:3]) + (args[3].abs(),) + tuple(args[4:])
                else:
                    kwargs["weight"] = kwargs["weight"].abs()
            return func(*args, **kwargs)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Geometry:
    """Where each unit of a layer looks: unit (y, x) sees input rows
    [offset_y + y * stride_y, offset_y + y * stride_y + size_y) and the same for columns."""
    size_y: int
    size_x: int
    stride_y: int
    stride_x: int
    offset_y: int
    offset_x: int
    whole: bool = False      # fc / global layers: every unit sees the whole input
    clipped: bool = False    # the field was larger than any canvas tried: sizes are lower bounds

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        top, left = self.offset_y + int(y) * self.stride_y, self.offset_x + int(x) * self.stride_x
        return top, left, top + self.size_y, left + self.size_x

    def as_dict(self) -> dict:
        return asdict(self)


def _support_boxes(backend, layer: str, canvas: tuple[int, int], units_at):
    """On a zero canvas of the given size: units_at(map height, map width) names up to two
    units (y, x) from the layer's map size (or None: this canvas does not suit); returns their
    support boxes (top, left, bottom, right), None where a unit's support is empty, or None.
    One forward pass gives both the map's size and the graph; one backward pass per unit over
    it. (The canvas is one image, not one per unit: the graph of a deep layer on a canvas of
    1,248 px held 3.2 GB for two; measured.)"""
    h, w = canvas
    x = torch.zeros(1, backend.channels, h, w, device=backend.device, requires_grad=True)
    out = []
    with torch.enable_grad(), SupportMode():
        a = backend.forward(x, [layer])[layer]
        units = units_at(*a.shape[-2:])
        if units is None:
            return None
        for i, (y, xx) in enumerate(units):
            seed = torch.zeros_like(a)
            seed[0, :, y, xx] = 1.0  # every channel: no dead channel can hide the field
            (g,) = torch.autograd.grad(a, x, grad_outputs=seed, allow_unused=True,
                                       retain_graph=i + 1 < len(units))
            if g is None:  # the layer does not depend on the input
                out.append(None)
                continue
            gi = g[0].abs().sum(0)
            ys = torch.nonzero(gi.sum(1)).flatten()
            xs = torch.nonzero(gi.sum(0)).flatten()
            out.append(None if not len(ys) else (int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1))
    return out


def layer_geometry(backend, layer: str) -> Geometry:
    """The receptive-field geometry of a layer (cached on the backend)."""
    layer = backend.resolve_layer(layer)
    cache = backend.cache("receptive_fields")
    if layer in cache:
        return cache[layer]
    H, W = backend.input_size
    shape = layer_shapes(backend, [layer])[layer]
    if len(shape) != 3 or shape[1:] == (1, 1):
        cache[layer] = Geometry(H, W, 0, 0, 0, 0, whole=True)
        return cache[layer]
    h, w = shape[1:]
    yc, xc = h // 2, w // 2
    best = None
    # Fields grow with depth: start where the previous layer's field fitted.
    start = backend.cache("receptive_margin").get("margin", 0)
    for margin in [m for m in (0, 64, 128, 256, 384, 512, 768, 1024) if m >= start]:
        shift = {}

        def units_at(hc, wc):
            dy, dx = hc - h, wc - w
            if dy % 2 or dx % 2:
                return None  # this margin does not keep the map aligned with the image's
            shift["y"], shift["x"] = dy // 2, dx // 2
            y0, x0 = yc + dy // 2, xc + dx // 2
            return [(y0, x0)] + ([(y0 + 1, x0 + 1)] if yc + 1 < h and xc + 1 < w else [])

        try:
            boxes = _support_boxes(backend, layer, (H + 2 * margin, W + 2 * margin), units_at)
        except Exception:
            if not margin:
                raise
            if best is not None and best.size_y >= H and best.size_x >= W and best.stride_y == best.stride_x == 0:
                # a model fixed to its input size (a ViT), whose neighbouring units both see the
                # whole input (after attention): every unit sees the whole image, decided
                best = Geometry(H, W, 0, 0, 0, 0, whole=True)
            break  # a model fixed to its input size: what the input size gave
        if boxes is None:
            continue
        dy, dx = shift["y"], shift["x"]
        if boxes[0] is None:
            raise DeepvisError(f"layer {layer}: no input pixel reaches its units; cannot find a receptive field")
        t, l, b, r = boxes[0]
        sy, sx = (boxes[1][0] - t, boxes[1][1] - l) if len(boxes) > 1 and boxes[1] else (H, W)
        if margin and (dy * sy != margin or dx * sx != margin):
            continue  # the map shifted by other than margin / stride: misaligned, try another
        inside = t > 0 and l > 0 and b < H + 2 * margin and r < W + 2 * margin
        best = Geometry(b - t, r - l, sy, sx, t - margin - yc * sy, l - margin - xc * sx, clipped=not inside)
        if inside:
            backend.cache("receptive_margin")["margin"] = margin
            break
    if best is None:
        raise DeepvisError(f"layer {layer}: cannot measure its receptive field")
    cache[layer] = best
    return best


def receptive_field(backend, layer: str, y: int, x: int) -> tuple[int, int, int, int]:
    """The input box (top, left, bottom, right), end-exclusive, in pixels of the network's input,
    that unit (y, x) of ``layer`` sees; it may reach past the image's edges. fc layers: the
    whole input."""
    return layer_geometry(backend, layer).box(y, x)


def crop_box(image, box: tuple[int, int, int, int]):
    """The box cut from an HxWxC array, zero-filled where it leaves the image."""
    import numpy as np

    t, l, b, r = box
    h, w = image.shape[:2]
    out = np.zeros((b - t, r - l) + image.shape[2:], image.dtype)
    ys, ye, xs, xe = max(t, 0), min(b, h), max(l, 0), min(r, w)
    if ys < ye and xs < xe:
        out[ys - t:ye - t, xs - l:xe - l] = image[ys:ye, xs:xe]
    return out

