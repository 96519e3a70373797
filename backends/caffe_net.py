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


def input_shape(net) -> tuple[int, int] | None:
    for layer in net.layer:
        if layer.type == "Input" and len(layer.input_param.shape):
            d = list(layer.input_param.shape[0].dim)
            return (d[2], d[3]) if len(d) == 4 else None
    if len(net.input_shape):
        d = list(net.input_shape[0].dim)
        return (d[2], d[3])
    if len(net.input_dim) == 4:
        return tuple(net.input_dim[2:4])
    return None


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


def build_layer(layer, blobs, channels: int) -> tuple[nn.Module, int]:
    """One Caffe layer as a module, and its output channel count."""
    t = layer_type(layer)
    if t in ("Convolution", "Deconvolution"):
        return _convolution(layer, blobs, channels, transposed=t == "Deconvolution"), layer.convolution_param.num_output
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
        return m, p.num_output
    if t == "ReLU":
        slope = layer.relu_param.negative_slope
        return (nn.LeakyReLU(slope) if slope else nn.ReLU()), channels
    if t == "Sigmoid":
        return nn.Sigmoid(), channels
    if t == "ELU":
        return nn.ELU(layer.elu_param.alpha), channels
    if t == "AbsVal":
        return AbsVal(), channels
    if t == "Power":
        p = layer.power_param
        return Power(p.power, p.scale, p.shift), channels
    if t == "PReLU":
        shared = layer.prelu_param.channel_shared
        _expect(layer, blobs, [(1,) if shared else (channels,)])
        m = nn.PReLU(1 if shared else channels)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(blobs[0].reshape(-1)))
        return m, channels
    if t == "TanH":
        return nn.Tanh(), channels
    if t == "Dropout":  # identity at test time (Caffe scales while training)
        return nn.Identity(), channels
    if t == "Pooling":
        try:
            return Pool(layer.pooling_param), channels
        except ValueError:
            raise DeepvisError(f"layer '{layer.name}': stochastic pooling is not supported") from None
    if t == "LRN":
        p = layer.lrn_param
        if p.norm_region != 0:
            raise DeepvisError(f"layer '{layer.name}': LRN WITHIN_CHANNEL is not supported (only ACROSS_CHANNELS)")
        return nn.LocalResponseNorm(p.local_size, p.alpha, p.beta, p.k), channels
    if t == "BatchNorm":
        _expect(layer, blobs, [(channels,), (channels,)])
        return BatchNorm(blobs, layer.batch_norm_param.eps), channels
    if t == "Scale":
        bias = layer.scale_param.bias_term
        _expect(layer, blobs, [(channels,)] + ([(channels,)] if bias else []))
        return Scale(blobs, bias), channels
    if t == "Eltwise":
        return Eltwise(layer.eltwise_param), channels
    if t == "Softmax":
        return Softmax(layer.softmax_param.axis), channels
    if t == "Flatten":
        return Flatten(), channels
    if t == "Split":
        return nn.Identity(), channels
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


class CaffeNet(nn.Module):
    """Runs the layers in prototxt order on a dict of named blobs."""

    def __init__(self, net, weights: dict, input_blob: str = "data", until: str | None = None):
        """net: the prototxt's NetParameter; weights: layer name -> list of blob arrays; until: the
        last blob to make (the layers after it, and their weights, are never built: a detector's
        head of unsupported layers does not stop its backbone). ``cut`` says whether any was left."""
        super().__init__()
        self.cut = False
        self.input_blob = input_blob
        self.steps: list[tuple[str, list[str], list[str]]] = []
        self.layers_ = nn.ModuleDict()
        channels = {input_blob: 3}
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
                    channels = {self.input_blob: 3}
                continue
            if any(r.phase == 0 for r in layer.include):  # TRAIN-only layers
                continue
            bottoms, tops = list(layer.bottom), list(layer.top)
            if until is not None and until in channels and not (tops == bottoms == [until]):
                self.cut = True  # past the blob, but for layers in place on it (its ReLU)
                break
            missing = [b for b in bottoms if b not in channels]
            if missing:
                raise DeepvisError(f"layer '{layer.name}' reads blob '{missing[0]}', which no earlier layer makes")
            if t == "Concat":
                axis = layer.concat_param.axis
                module, c = Concat(axis), sum(channels[b] for b in bottoms)
            else:
                try:
                    module, c = build_layer(layer, weights.get(layer.name, []), channels[bottoms[0]])
                except UnsupportedLayer as e:
                    raise DeepvisError(f"{e}; to look at the network before it, give backend.until={bottoms[0]}") \
                        from None
            key = f"l{len(self.steps)}_{layer.name}".replace(".", "_")
            self.layers_[key] = module
            self.steps.append((key, bottoms, tops))
            for top in tops:
                channels[top] = c
        self.channels = channels

    def blob_writers(self) -> list[tuple[str, str]]:
        """(blob name, the submodule whose output is the blob's final value), in order of first
        appearance: an in-place layer's output replaces its bottom's value, as in Caffe."""
        order, last = [], {}
        for key, _bottoms, tops in self.steps:
            if len(tops) != 1:
                continue
            if tops[0] not in last:
                order.append(tops[0])
            last[tops[0]] = f"layers_.{key}"
        return [(b, last[b]) for b in order]

    def blob_shapes(self, size) -> dict[str, tuple]:
        """Every blob's shape (without the batch) for an input of size (H, W), from a zero image
        run through layer by layer: a layer whose weights do not fit what reaches it (an
        InnerProduct sized for another input) is named, with both shapes."""
        blobs = {self.input_blob: torch.zeros(1, 3, *size)}
        with torch.no_grad():
            for key, bottoms, tops in self.steps:
                ins = [blobs[b] for b in bottoms]
                try:
                    out = self.layers_[key](*ins)
                except RuntimeError as e:
                    name = key.split("_", 1)[1]
                    shapes = ", ".join(str(tuple(t.shape[1:])) for t in ins)
                    raise DeepvisError(f"layer '{name}' does not fit its input of shape {shapes}: "
                                       f"{str(e).splitlines()[0][:160]}") from None
                for t in tops:
                    blobs[t] = out
        return {b: tuple(t.shape[1:]) for b, t in blobs.items()}

    def forward(self, x):
        blobs = {self.input_blob: x}
        out = x
        for key, bottoms, tops in self.steps:
            out = self.layers_[key](*[blobs[b] for b in bottoms])
            for t in tops:
                blobs[t] = out
        return out
