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
    #: how it was found, for the manifest: 'probe' (two units' fields, exact), 'probe, N units'
    #: (an upsampled layer: the affine box holding N units' fields), 'vector', 'global' (the field
    #: grows with the canvas: every unit sees every pixel), 'fixed-size model', 'clipped at N px'
    method: str = "probe"

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


#: The largest canvas the probe builds, per side: its graph's memory grows with the canvas's area
#: (a deep layer on 1,248 px held 3.2 GB; a U-Net's on 2,368 px 14 GB): a field larger than this
#: is said to be clipped (a lower bound), never probed further.
def max_canvas(h: int, w: int) -> int:
    return max(1248, 4 * max(h, w))


def layer_geometry(backend, layer: str) -> Geometry:
    """The receptive-field geometry of a layer (cached on the backend). Bounded: at most one probe
    per margin, canvases up to ``max_canvas``; a field that spans every canvas is decided global."""
    layer = backend.resolve_layer(layer)
    cache = backend.cache("receptive_fields")
    if layer in cache:
        return cache[layer]
    H, W = backend.input_size
    shape = layer_shapes(backend, [layer])[layer]
    if len(shape) != 3 or shape[1:] == (1, 1):
        cache[layer] = Geometry(H, W, 0, 0, 0, 0, whole=True, method="vector")
        return cache[layer]
    h, w = shape[1:]
    yc, xc = h // 2, w // 2
    # the centre unit and diagonal neighbours: two suffice where neighbours' fields are shifts of
    # each other; an upsampled layer (2x2 units sharing one field) needs more to see its stride
    reach = [k for k in range(1, 5) if yc + k < h and xc + k < w]
    best, spans, unaligned = None, 0, False
    # Fields grow with depth: start where the previous layer's field fitted.
    start = backend.cache("receptive_margin").get("margin", 0)
    limit = max_canvas(H, W)
    margins = [m for m in (0, 64, 128, 256, 384, 512, 768, 1024) if m >= start and max(H, W) + 2 * m <= limit]
    for margin in margins:
        shift = {}

        def units_at(hc, wc):
            dy, dx = hc - h, wc - w
            if dy % 2 or dx % 2:
                return None  # this margin does not keep the map aligned with the image's
            shift["y"], shift["x"] = dy // 2, dx // 2
            y0, x0 = yc + dy // 2, xc + dx // 2
            return [(y0, x0)] + [(y0 + k, x0 + k) for k in reach]

        Hc, Wc = H + 2 * margin, W + 2 * margin
        try:
            boxes = _support_boxes(backend, layer, (Hc, Wc), units_at)
        except Exception:
            if not margin:
                raise
            if best is not None and best.size_y >= H and best.size_x >= W and best.stride_y == best.stride_x == 0:
                # a model fixed to its input size (a ViT), whose neighbouring units both see the
                # whole input (after attention): every unit sees the whole image, decided
                best = Geometry(H, W, 0, 0, 0, 0, whole=True, method="fixed-size model: every unit sees it all")
            break  # a model fixed to its input size: what the input size gave
        if boxes is None:
            continue
        dy, dx = shift["y"], shift["x"]
        if boxes[0] is None:
            raise DeepvisError(f"layer {layer}: no input pixel reaches its units; cannot find a receptive field")
        if all(b == (0, 0, Hc, Wc) for b in boxes):
            spans += 1
            if spans == 2 or (margin and margin == margins[-1]):
                # the field grew with the canvas twice (a squeeze-excite gate, global pooling,
                # attention): every unit sees every pixel, decided, not a fallback
                best = Geometry(H, W, 0, 0, 0, 0, whole=True, method="global: the field spans every canvas")
                break
            best = Geometry(H, W, 0, 0, 0, 0, whole=True, method="global: the field spans the input")
            continue
        geometry = _affine(boxes, [0] + reach, margin, yc, xc, H, W)
        if geometry is None:
            unaligned = True
            continue  # units' fields do not line up on this canvas
        sy, sx = geometry.stride_y, geometry.stride_x
        if margin and (dy * sy != margin or dx * sx != margin):
            continue  # the map shifted by other than margin / stride: misaligned, try another
        t, l = geometry.offset_y + margin + yc * sy, geometry.offset_x + margin + xc * sx
        inside = t > 0 and l > 0 and t + geometry.size_y < Hc and l + geometry.size_x < Wc
        best = Geometry(geometry.size_y, geometry.size_x, sy, sx, geometry.offset_y, geometry.offset_x,
                        clipped=not inside, method=geometry.method if inside else f"clipped at {Hc} px")
        if inside:
            backend.cache("receptive_margin")["margin"] = margin
            break
    if best is None and unaligned:
        # neighbouring units see differently shaped parts of the input (Swin's windowed attention:
        # a unit sees its window, its neighbour another): no one box and stride describes the layer.
        # Its units are shown on the whole input, as a ViT's are, rather than failing the atlas.
        best = Geometry(H, W, 0, 0, 0, 0, whole=True,
                        method="position-dependent: neighbouring units' fields do not line up")
    if best is None:
        raise DeepvisError(f"layer {layer}: cannot measure its receptive field (no canvas up to {limit} px "
                           "lined its units up)")
    cache[layer] = best
    return best


def _affine(boxes, steps, margin, yc, xc, H, W) -> Geometry | None:
    """Unit (yc + k, xc + k)'s box for each k in steps -> the geometry: exact when the first two
    are shifts of each other by a whole stride and the rest follow (method 'probe'); otherwise the
    smallest affine box that holds every measured field, at the stride the farthest unit gives
    (an upsampled layer, whose neighbours share fields: 'probe, N units'). Offsets are in the
    input's pixels (the canvas's margin taken off)."""
    known = [(k, b) for k, b in zip(steps, boxes) if b is not None]
    if len(known) < 2:
        (k0, (t, l, b, r)), = known[:1] or [(0, (0, 0, H, W))]
        return Geometry(b - t, r - l, H, W, t - margin - yc * H, l - margin - xc * W)  # one unit: as before
    (_, b0), (k1, b1) = known[0], known[1]
    sy, sx = b1[0] - b0[0], b1[1] - b0[1]
    size_y, size_x = b0[2] - b0[0], b0[3] - b0[1]
    exact = k1 == 1 and sy > 0 and sx > 0 and all(
        bk == (b0[0] + k * sy, b0[1] + k * sx, b0[2] + k * sy, b0[3] + k * sx) for k, bk in known)
    if exact:
        return Geometry(size_y, size_x, sy, sx, b0[0] - margin - yc * sy, b0[1] - margin - xc * sx)
    kf, bf = known[-1]
    sy, sx = round((bf[0] - b0[0]) / kf), round((bf[1] - b0[1]) / kf)
    if sy <= 0 or sx <= 0:
        return None
    top = min(b[0] - k * sy for k, b in known)
    left = min(b[1] - k * sx for k, b in known)
    bottom = max(b[2] - k * sy for k, b in known)
    right = max(b[3] - k * sx for k, b in known)
    return Geometry(bottom - top, right - left, sy, sx, top - margin - yc * sy, left - margin - xc * sx,
                    method=f"probe, {len(known)} units")


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

