"""A Caffe net (deploy prototxt + caffemodel) as a PyTorch module with Caffe's own semantics.

Each Caffe layer becomes a submodule; the forward pass keeps Caffe's blobs by name, so in-place
layers behave as in Caffe (after `relu1`, the blob `conv1` holds the rectified values). The
caffemodel is read with the protobuf descriptor of caffe.proto (backends/caffe_proto.py).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepvis_repro.errors import DeepvisError

from . import caffe_proto
from .caffe_proto import RAW_DTYPES

SKIPPED_IN_DEPLOY = {"Input", "Data", "ImageData", "MemoryData", "HDF5Data", "DummyData", "Silence",
                     "Accuracy", "SoftmaxWithLoss", "EuclideanLoss", "HingeLoss"}


# ----- reading files ------------------------------------------------------------------------------
def read_prototxt(path: str):
    from google.protobuf import text_format

    if not os.path.isfile(path):
        raise DeepvisError(f"prototxt not found: {path}")
    net = caffe_proto.NetParameter()
    try:
        with open(path) as f:
            text_format.Merge(f.read(), net)
    except text_format.ParseError as e:  # its message holds line:column
        raise DeepvisError(f"prototxt syntax error in {path}: line {e}") from None
    except UnicodeDecodeError:
        raise DeepvisError(f"prototxt {path} is not a text file") from None
    return net


def read_caffemodel(path: str):
    from google.protobuf.message import DecodeError

    if not os.path.isfile(path):
        raise DeepvisError(f"caffemodel not found: {path}")
    net = caffe_proto.NetParameter()
    with open(path, "rb") as f:
        data = f.read()
    try:
        net.ParseFromString(data)
    except DecodeError as e:
        raise DeepvisError(f"caffemodel {path} is corrupt or truncated ({e})") from None
    if not (len(net.layer) or len(net.layers)):
        raise DeepvisError(f"caffemodel {path} holds no layers (empty, or not a caffemodel)")
    return net


def blob_array(blob) -> np.ndarray:
    shape = list(blob.shape.dim) if blob.HasField("shape") else \
        [d for d in (blob.num, blob.channels, blob.height, blob.width)]
    if blob.raw_data:  # NVIDIA Caffe's / OpenCV's raw storage: half precision, most often
        kind = RAW_DTYPES.get(blob.raw_data_type)
        if kind is None:
            raise DeepvisError(f"blob of shape {shape} is stored as raw data of type "
                               f"{blob.raw_data_type} (INT/UINT), which holds no weights")
        if len(blob.raw_data) % np.dtype(kind).itemsize:
            raise DeepvisError(f"blob of shape {shape}: its raw data ({len(blob.raw_data)} bytes) is not a whole "
                               f"number of {np.dtype(kind).name} values")
        data = np.frombuffer(blob.raw_data, dtype=kind).astype(np.float32)
    else:
        data = np.asarray(blob.data if len(blob.data) else blob.double_data, dtype=np.float32)
    if data.size != int(np.prod(shape)):
        raise DeepvisError(f"blob holds {data.size} values but declares shape {shape}")
    return data.reshape(shape)


def trained_blobs(model) -> dict[str, list[np.ndarray]]:
    """layer name -> its blobs (weights, bias, ...), from new-style or V1 caffemodels."""
    out = {}
    for layer in list(model.layer) + list(model.layers):
        if len(layer.blobs):
            out[layer.name] = [blob_array(b) for b in layer.blobs]
    return out


def layer_type(layer) -> str:
    t = layer.type
    return caffe_proto.v1_type_name(t) if isinstance(t, int) else t


def input_dims(net) -> list[int] | None:
    """The declared input blob's dims (N, C, H, W): an Input layer's, input_shape or input_dim."""
    for layer in net.layer:
        if layer.type == "Input" and len(layer.input_param.shape):
            return [int(v) for v in layer.input_param.shape[0].dim]
    if len(net.input_shape):
        return [int(v) for v in net.input_shape[0].dim]
    if len(net.input_dim):
        return [int(v) for v in net.input_dim]
    return None


def input_shape(net) -> tuple[int, int] | None:
    d = input_dims(net)
    return (d[2], d[3]) if d is not None and len(d) == 4 else None


def input_channels(net) -> int:
    """The channels the net declares for its input (3 where it declares none: Caffe's data layers)."""
    d = input_dims(net)
    return d[1] if d is not None and len(d) == 4 and d[1] > 0 else 3


# ----- layers ---------------------------------------------------------------------------------------
def _pair(values, h, w, default):
    """Caffe's kernel/stride/pad: repeated field, or the _h/_w pair, or a default."""
    if h or w:
        return int(h), int(w)
    values = list(values)
    if not values:
        return default, default
    return (int(values[0]), int(values[-1]))


class Pool(nn.Module):
    """Caffe pooling: output ceil((H + 2p - k) / s) + 1, the last window starting inside the
    image or its top/left padding; AVE counts the padding in its divisor, not the overhang."""

    def __init__(self, p):
        super().__init__()
        self.max = p.pool == 0
        if p.pool not in (0, 1):
            raise ValueError("stochastic pooling")
        self.global_ = p.global_pooling
        self.k = (p.kernel_h, p.kernel_w) if p.kernel_h else (p.kernel_size, p.kernel_size)
        self.s = (p.stride_h, p.stride_w) if p.stride_h else (p.stride, p.stride)
        self.p = (p.pad_h, p.pad_w) if (p.pad_h or p.pad_w) else (p.pad, p.pad)

    def forward(self, x):
        if self.global_:
            return x.amax((2, 3), keepdim=True) if self.max else x.mean((2, 3), keepdim=True)
        if self.max:
            return F.max_pool2d(x, self.k, self.s, self.p, ceil_mode=True)
        return F.avg_pool2d(x, self.k, self.s, self.p, ceil_mode=True, count_include_pad=True)


class BatchNorm(nn.Module):
    """Caffe BatchNorm (inference): blobs mean, variance and a moving-average scale factor."""

    def __init__(self, blobs, eps):
        super().__init__()
        s = float(blobs[2].reshape(-1)[0]) if len(blobs) > 2 else 1.0
        s = 0.0 if s == 0 else 1.0 / s
        self.register_buffer("mean", torch.tensor(blobs[0] * s).view(1, -1, 1, 1))
        self.register_buffer("var", torch.tensor(blobs[1] * s).view(1, -1, 1, 1))
        self.eps = eps

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / torch.sqrt(self.var.view(shape) + self.eps)


class Scale(nn.Module):
    def __init__(self, blobs, bias_term):
        super().__init__()
        self.register_buffer("gamma", torch.tensor(blobs[0]).view(-1))
        self.register_buffer("beta", torch.tensor(blobs[1]).view(-1) if bias_term else None)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x * self.gamma.view(shape)
        return y + self.beta.view(shape) if self.beta is not None else y


class Eltwise(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.op = p.operation  # 0 PROD, 1 SUM, 2 MAX
        self.coeff = list(p.coeff)

    def forward(self, *xs):
        if self.op == 0:
            out = xs[0]
            for x in xs[1:]:
                out = out * x
            return out
        if self.op == 2:
            return torch.stack(xs).amax(0)
        coeff = self.coeff or [1.0] * len(xs)
        return sum(c * x for c, x in zip(coeff, xs))


class Concat(nn.Module):
    def __init__(self, axis):
        super().__init__()
        self.axis = axis

    def forward(self, *xs):
        return torch.cat(xs, self.axis)


class InnerProduct(nn.Linear):
    def forward(self, x):
        return super().forward(x.flatten(1))


class Softmax(nn.Module):
    def __init__(self, axis):
        super().__init__()
        self.axis = axis

    def forward(self, x):
        return torch.softmax(x, self.axis)


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def _expect(layer, blobs, shapes):
    """Check trained blob shapes against the prototxt's; name the layer and both shapes."""
    if len(blobs) < len(shapes):
        raise DeepvisError(f"layer '{layer.name}': the caffemodel has {len(blobs)} blob(s), "
                           f"the prototxt needs {len(shapes)}")
    for i, want in enumerate(shapes):
        got = tuple(blobs[i].shape)
        if int(np.prod(got)) != int(np.prod(want)) or (len(got) == len(want) and got != tuple(want)):
            raise DeepvisError(f"layer '{layer.name}': weights of shape {got} do not match the "
                               f"prototxt's {tuple(want)}")


def _convolution(layer, blobs, channels: int, transposed: bool) -> nn.Module:
    """Convolution, or Deconvolution (transposed), with Caffe's weights: (out, in / group, kh, kw)
    for a convolution, (in, out / group, kh, kw) for a deconvolution (ConvTranspose2d's layouts)."""
    p = layer.convolution_param
    k = _pair(p.kernel_size, p.kernel_h, p.kernel_w, 1)
    s = _pair(p.stride, p.stride_h, p.stride_w, 1)
    pad = _pair(p.pad, p.pad_h, p.pad_w, 0)
    dil = _pair(p.dilation, 0, 0, 1)
    g, n = p.group, p.num_output
    if g < 1 or channels % g or n % g:
        raise DeepvisError(f"layer '{layer.name}': group {g} does not divide its channels")
    weight = (channels, n // g, *k) if transposed else (n, channels // g, *k)
    _expect(layer, blobs, [weight] + ([(n,)] if p.bias_term else []))  # before allocating: only claims
    if transposed:
        m = nn.ConvTranspose2d(channels, n, k, s, pad, 0, g, bias=p.bias_term, dilation=dil)
    else:
        m = nn.Conv2d(channels, n, k, s, pad, dil, g, bias=p.bias_term)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(blobs[0].reshape(m.weight.shape)))
        if p.bias_term:
            m.bias.copy_(torch.from_numpy(blobs[1].reshape(-1)))
    return m


class UnsupportedLayer(DeepvisError):
    """A layer type this backend does not have (CaffeNet then suggests cutting the net before it)."""


def build_layer(layer, blobs, shape: tuple) -> nn.Module:
    """One Caffe layer as a module; shape: its (first) bottom's shape without the batch."""
    channels = shape[0] if shape else 1
    t = layer_type(layer)
    if t in ("Convolution", "Deconvolution"):
        return _convolution(layer, blobs, channels, transposed=t == "Deconvolution")
    if t == "InnerProduct":
        p = layer.inner_product_param
        if not blobs:
            raise DeepvisError(f"layer '{layer.name}': the caffemodel has no weights for it")
        if p.num_output < 1 or blobs[0].size % p.num_output:
            raise DeepvisError(f"layer '{layer.name}': its weights ({blobs[0].size} values, shape "
                               f"{tuple(blobs[0].shape)}) do not fit num_output {p.num_output}")
        w = blobs[0].reshape(p.num_output, -1) if not p.transpose else blobs[0].reshape(-1, p.num_output).T
        _expect(layer, blobs, [(p.num_output, w.shape[1])] + ([(p.num_output,)] if p.bias_term else []))
        m = InnerProduct(w.shape[1], p.num_output, bias=p.bias_term)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            if p.bias_term:
                m.bias.copy_(torch.from_numpy(blobs[1].reshape(-1)))
        return m
    if t == "ReLU":
        slope = layer.relu_param.negative_slope
        return (nn.LeakyReLU(slope) if slope else nn.ReLU())
    if t == "Sigmoid":
        return nn.Sigmoid()
    if t == "ELU":
        return nn.ELU(layer.elu_param.alpha)
    if t == "AbsVal":
        return AbsVal()
    if t == "Power":
        p = layer.power_param
        return Power(p.power, p.scale, p.shift)
    if t == "PReLU":
        shared = layer.prelu_param.channel_shared
        _expect(layer, blobs, [(1,) if shared else (channels,)])
        m = nn.PReLU(1 if shared else channels)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(blobs[0].reshape(-1)))
        return m
    if t == "TanH":
        return nn.Tanh()
    if t == "Dropout":  # identity at test time (Caffe scales while training)
        return nn.Identity()
    if t == "Pooling":
        try:
            return Pool(layer.pooling_param)
        except ValueError:
            raise DeepvisError(f"layer '{layer.name}': stochastic pooling is not supported") from None
    if t == "LRN":
        p = layer.lrn_param
        if p.norm_region != 0:
            raise DeepvisError(f"layer '{layer.name}': LRN WITHIN_CHANNEL is not supported (only ACROSS_CHANNELS)")
        return nn.LocalResponseNorm(p.local_size, p.alpha, p.beta, p.k)
    if t == "BatchNorm":
        _expect(layer, blobs, [(channels,), (channels,)])
        return BatchNorm(blobs, layer.batch_norm_param.eps)
    if t == "Scale":
        bias = layer.scale_param.bias_term
        _expect(layer, blobs, [(channels,)] + ([(channels,)] if bias else []))
        return Scale(blobs, bias)
    if t == "Eltwise":
        return Eltwise(layer.eltwise_param)
    if t == "Softmax":
        return Softmax(layer.softmax_param.axis)
    if t == "Flatten":
        return Flatten()
    if t == "Split":
        return nn.Identity()
    if t == "Crop":
        return Crop(layer, len(shape) + 1)
    if t == "Normalize":
        p = layer.norm_param
        _expect(layer, blobs, [(1,) if p.channel_shared else (channels,)])
        return Normalize(blobs[0], p.across_spatial, p.eps)
    if t == "Permute":
        return Permute(layer, len(shape) + 1)
    if t == "Reshape":
        return Reshape(layer, shape)
    if t == "Slice":
        return Slice(layer, shape, len(layer.top))
    raise UnsupportedLayer(f"unsupported layer '{layer.name}' of type {t}")


class AbsVal(nn.Module):
    """Caffe's AbsVal: |x| (its gradient is sign(x), 0 at 0, as torch.abs's)."""

    def forward(self, x):
        return x.abs()


class Power(nn.Module):
    """Caffe's Power: (shift + scale * x) ^ power."""

    def __init__(self, power: float, scale: float, shift: float):
        super().__init__()
        self.power, self.scale, self.shift = float(power), float(scale), float(shift)

    def forward(self, x):
        y = x * self.scale + self.shift if (self.scale, self.shift) != (1.0, 0.0) else x
        return y if self.power == 1.0 else y.pow(self.power)


def _axis(layer, axis: int, dims: int, what: str) -> int:
    """Caffe's canonical axis (negative counts from the end) of a blob with dims axes (batch
    included); the batch axis itself is refused: this backend runs batches of images."""
    a = axis + dims if axis < 0 else axis
    if not 1 <= a < dims:
        raise DeepvisError(f"layer '{layer.name}': {what} axis {axis} of a {dims}-axis blob "
                           + ("is the batch axis, which this backend keeps" if a == 0 else "does not exist"))
    return a


class Crop(nn.Module):
    """Caffe's Crop: the first bottom cut to the second's size in every axis from ``axis`` on, at
    ``offset`` (one value for all those axes, or one each; 0 by default)."""

    def __init__(self, layer, dims: int):
        super().__init__()
        p = layer.crop_param
        self.axis = _axis(layer, p.axis, dims, "crop")
        self.offsets = [int(v) for v in p.offset]
        if len(self.offsets) not in (0, 1, dims - self.axis):
            raise DeepvisError(f"layer '{layer.name}': {len(self.offsets)} crop offsets for "
                               f"{dims - self.axis} cropped axes")

    def forward(self, x, ref):
        out = x
        for i in range(self.axis, x.dim()):
            off = self.offsets[0] if len(self.offsets) == 1 else self.offsets[i - self.axis] if self.offsets else 0
            out = out.narrow(i, off, ref.shape[i])
        return out


class Normalize(nn.Module):
    """SSD's Normalize: x / sqrt(sum of squares + eps), the sum over channels at each position
    (across_spatial false) or over the whole blob of each image, then times a learned scale (one
    value, or one per channel)."""

    def __init__(self, scale: np.ndarray, across_spatial: bool, eps: float):
        super().__init__()
        self.register_buffer("scale", torch.tensor(np.asarray(scale, np.float32).reshape(-1)))
        self.across_spatial, self.eps = bool(across_spatial), float(eps)

    def forward(self, x):
        dims = tuple(range(1, x.dim())) if self.across_spatial else (1,)
        norm = torch.sqrt((x * x).sum(dims, keepdim=True) + self.eps)
        return x / norm * self.scale.view((1, -1) + (1,) * (x.dim() - 2))


class Permute(nn.Module):
    """SSD's Permute: the axes in ``order``, the ones it leaves out after them in their order."""

    def __init__(self, layer, dims: int):
        super().__init__()
        order = [int(v) for v in layer.permute_param.order]
        if len(set(order)) != len(order) or any(not 0 <= o < dims for o in order):
            raise DeepvisError(f"layer '{layer.name}': permute order {order} is not a permutation of "
                               f"the {dims} axes")
        self.order = order + [i for i in range(dims) if i not in order]
        if self.order[0] != 0:
            raise DeepvisError(f"layer '{layer.name}': permute order {order} moves the batch axis, "
                               "which this backend keeps")

    def forward(self, x):
        return x.permute(self.order)


class Reshape(nn.Module):
    """Caffe's Reshape: ``shape`` replaces the axes axis .. axis+num_axes (-1: to the end); a 0 copies
    the input's axis at that place, a -1 is inferred. The batch axis always keeps the batch (a deploy
    prototxt's fixed batch of 1 would stop batches of images)."""

    def __init__(self, layer, shape: tuple):
        super().__init__()
        p = layer.reshape_param
        dims = len(shape) + 1
        self.start = p.axis if p.axis >= 0 else dims + p.axis + 1
        self.end = dims if p.num_axes == -1 else self.start + p.num_axes
        self.new = [int(v) for v in p.shape.dim]
        if not 0 <= self.start <= self.end <= dims or sum(v == -1 for v in self.new) > 1 \
                or any(v < -1 for v in self.new):
            raise DeepvisError(f"layer '{layer.name}': reshape to {self.new} at axis {p.axis} "
                               f"(num_axes {p.num_axes}) does not fit a {dims}-axis blob")
        if self.start == 0 and self.new:
            self.new[0] = 0  # the batch, whatever the deploy prototxt fixed it to

    def forward(self, x):
        new = [x.shape[self.start + i] if v == 0 else v for i, v in enumerate(self.new)]
        return x.reshape(list(x.shape[:self.start]) + new + list(x.shape[self.end:]))


class Slice(nn.Module):
    """Caffe's Slice: the bottom cut along ``axis`` at slice_point (or into equal parts, one per
    top). Its output is the tuple of parts; Pick(i) modules make each top a blob of its own."""

    def __init__(self, layer, shape: tuple, tops: int):
        super().__init__()
        p = layer.slice_param
        axis = p.axis if p.HasField("axis") or not p.HasField("slice_dim") else p.slice_dim
        self.axis = _axis(layer, axis, len(shape) + 1, "slice")
        n = shape[self.axis - 1]
        points = [int(v) for v in p.slice_point]
        if points:
            if len(points) != tops - 1 or points != sorted(points) or not 0 < points[0] or points[-1] >= n:
                raise DeepvisError(f"layer '{layer.name}': slice points {points} do not cut {n} into "
                                   f"{tops} parts")
            edges = [0] + points + [n]
            self.sizes = [b - a for a, b in zip(edges, edges[1:])]
        else:
            if n % tops:
                raise DeepvisError(f"layer '{layer.name}': {n} does not slice into {tops} equal parts")
            self.sizes = [n // tops] * tops

    def forward(self, x):
        return tuple(x.split(self.sizes, self.axis))


class Pick(nn.Module):
    """Part i of a Slice's tuple: the module whose output is the top's blob."""

    def __init__(self, i: int):
        super().__init__()
        self.i = i

    def forward(self, parts):
        return parts[self.i]


class CaffeNet(nn.Module):
    """Runs the layers in prototxt order on a dict of named blobs."""

    def __init__(self, net, weights: dict, size: tuple[int, int], input_blob: str = "data",
                 until: str | None = None, channels: int = 3):
        """net: the prototxt's NetParameter; weights: layer name -> list of blob arrays; size: the
        input's (H, W); until: the last blob to make (the layers after it, and their weights, are
        never built: a detector's head of unsupported layers does not stop its backbone). ``cut``
        says whether any was left. Each layer is run on a zero image as it is built: ``shapes`` is
        every blob's shape (without the batch), which the next layers are built for, and a layer
        whose weights do not fit what reaches it (an InnerProduct sized for another input) is named,
        with both shapes."""
        super().__init__()
        self.cut = False
        self.input_blob = input_blob
        self.steps: list[tuple[str, list[str], list[str]]] = []
        self.layers_ = nn.ModuleDict()
        self.input_channels = int(channels)
        zeros = lambda: torch.zeros(1, self.input_channels, *size)  # noqa: E731
        probe = {input_blob: zeros()}
        layers = list(net.layer) or list(net.layers)
        blobs = list(dict.fromkeys(t for l in layers for t in l.top))
        if until is not None and until not in blobs:  # checked first: a typo is named as such
            raise DeepvisError(f"until={until}: the net makes no blob of that name; its blobs: "
                               f"{', '.join(blobs[:12])}{' ...' if len(blobs) > 12 else ''}")
        for layer in layers:
            t = layer_type(layer)
            if t in SKIPPED_IN_DEPLOY:
                if t == "Input" and layer.top:
                    self.input_blob = layer.top[0]
                    probe = {self.input_blob: zeros()}
                continue
            if any(r.phase == 0 for r in layer.include):  # TRAIN-only layers
                continue
            bottoms, tops = list(layer.bottom), list(layer.top)
            if until is not None and until in probe and not (tops == bottoms == [until]):
                self.cut = True  # past the blob, but for layers in place on it (its ReLU)
                break
            missing = [b for b in bottoms if b not in probe]
            if missing:
                raise DeepvisError(f"layer '{layer.name}' reads blob '{missing[0]}', which no earlier layer makes")
            shape = tuple(probe[bottoms[0]].shape[1:])
            if t == "Concat":
                module = Concat(layer.concat_param.axis)
            else:
                try:
                    module = build_layer(layer, weights.get(layer.name, []), shape)
                except UnsupportedLayer as e:
                    raise DeepvisError(f"{e}; to look at the network before it, give backend.until={bottoms[0]}") \
                        from None
            with torch.no_grad():
                try:
                    out = module(*[probe[b] for b in bottoms])
                except (RuntimeError, IndexError) as e:
                    shapes = ", ".join(str(tuple(probe[b].shape[1:])) for b in bottoms)
                    raise DeepvisError(f"layer '{layer.name}' does not fit its input of shape {shapes}: "
                                       f"{str(e).splitlines()[0][:160]}") from None
            key = f"l{len(self.steps)}_{layer.name}".replace(".", "_")
            self.layers_[key] = module
            if isinstance(module, Slice):  # one blob per part, each the output of its own Pick
                parts = f"{key}:parts"
                self.steps.append((key, bottoms, [parts]))
                for i, top in enumerate(tops):
                    pick = f"l{len(self.steps)}_{layer.name}_{i}".replace(".", "_")
                    self.layers_[pick] = Pick(i)
                    self.steps.append((pick, [parts], [top]))
                    probe[top] = out[i]
                continue
            self.steps.append((key, bottoms, tops))
            for top in tops:
                probe[top] = out
        self.shapes = {b: tuple(v.shape[1:]) for b, v in probe.items()}

    def blob_writers(self) -> list[tuple[str, str]]:
        """(blob name, the submodule whose output is the blob's final value), in order of first
        appearance: an in-place layer's output replaces its bottom's value, as in Caffe. (A
        Slice's tuple of parts is no blob: its Picks make the tops.)"""
        order, last = [], {}
        for key, _bottoms, tops in self.steps:
            if len(tops) != 1 or isinstance(self.layers_[key], Slice):
                continue
            if tops[0] not in last:
                order.append(tops[0])
            last[tops[0]] = f"layers_.{key}"
        return [(b, last[b]) for b in order]

    def forward(self, x):
        blobs = {self.input_blob: x}
        out = x
        for key, bottoms, tops in self.steps:
            out = self.layers_[key](*[blobs[b] for b in bottoms])
            for t in tops:
                blobs[t] = out
        return out
