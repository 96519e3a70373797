"""A Caffe model (deploy prototxt + caffemodel) as a clean ONNX file: standard operators at
opset 17, a dynamic batch dimension, weights as initializers, Caffe's blob names kept.

Written from the net as the Caffe backend parses it (caffe_net.CaffeNet), so both routes share one
reading of the files; the ONNX route is then an independent second implementation of every layer
(onnxruntime or onnx2torch run it), which tests/test_convert.py checks blob by blob against the
direct route.

Naming: a blob's final value (after Caffe's in-place layers, as the Caffe backend defines it) is
the ONNX value of the same name, produced by a node of the same name; a value an in-place layer
later overwrites is named ``<blob>/<layer>``. Dropout (in place, identity at test time) and Split
write no node. Caffe's pooling arithmetic is made explicit: the output size rounds up (pads at
the end instead of ceil_mode, so every runtime agrees) and AVE pooling's divisor counts the padding
but not the overhang (a constant correction map after AveragePool).

The model's metadata (``deepvis.*``) records the input's channel order (BGR), mean (RGB, 0..255, as
deepvis backends take it), input scale, layout, resize, the blob names in order, and the source
files' SHA-256: ``backend=onnx backend.path=model.onnx`` needs no options.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from deepvis_repro.errors import DeepvisError
from deepvis_repro.files import file_sha256, write_bytes

from .caffe_net import (AbsVal, BatchNorm, Concat, Crop, Eltwise, Flatten, InnerProduct, Normalize, Permute, Pick, Pool,
                        Power, Reshape, Scale, Slice, Softmax)


OPSET = 17


class _Graph:
    """Nodes and initializers being built, with unique value names."""

    def __init__(self):
        self.nodes, self.inits = [], []
        self.used: set = set()

    def value(self, name: str) -> str:
        base, n = name, 1
        while name in self.used:
            name = f"{base}_{n}"
            n += 1
        self.used.add(name)
        return name

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper

        name = self.value(name)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list, output, name: str | None = None, **attrs):
        """One node; output: a value name (returned), or a list of them (a node of several)."""
        from onnx import helper

        outputs = output if isinstance(output, list) else [output]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name or outputs[0], **attrs))
        return output


def _pool_pads(size: int, k: int, s: int, p: int) -> tuple[int, int, int]:
    """Caffe's pooled size (ceil, less a window that would start in the end padding) and the end
    padding that makes ONNX's floor arithmetic give it: (out, pad_begin, pad_end)."""
    out = int(math.ceil((size + 2 * p - k) / s)) + 1
    if p and (out - 1) * s >= size + p:
        out -= 1
    end = max(p, (out - 1) * s + k - size - p)
    return out, p, end


def _ave_correction(size: int, k: int, s: int, p: int, out: int) -> np.ndarray:
    """Per output position: (k / Caffe's window length), Caffe counting the padding but not the
    overhang past size + p (AveragePool with count_include_pad divides by k)."""
    corr = np.ones(out, np.float32)
    for i in range(out):
        start = i * s - p
        end = min(start + k, size + p)
        corr[i] = k / (end - start)
    return corr


def convert_caffe(backend, prototxt: str, weights: str, meta: dict | None = None):
    """The ONNX ModelProto of a loaded CaffeBackend (its parsed net and weights)."""
    from onnx import TensorProto, helper

    net = backend.module
    h, w = backend.input_size
    g = _Graph()
    inp = g.value(net.input_blob)
    values = {net.input_blob: inp}            # blob -> the ONNX value holding it now
    shapes = backend.blob_shapes              # blob -> its shape without the batch (in-place keeps it)
    final = dict(net.blob_writers())          # blob -> the module path of its last writer
    for key, bottoms, tops in net.steps:      # in-place Dropout is a no-op: the writer before it counts
        m = net.layers_[key]
        if len(tops) == 1 and not (isinstance(m, torch.nn.Identity) and tops[0] in bottoms):
            final[tops[0]] = f"layers_.{key}"
    for key, bottoms, tops in net.steps:
        layer = key.split("_", 1)[1]
        m = net.layers_[key]
        if isinstance(m, Slice):  # one Split; its parts become the tops through the Picks below
            parts = [g.value(f"{layer}/part{i}") for i in range(len(m.sizes))]
            g.node("Split", [values[bottoms[0]], g.const(f"{layer}.split", np.array(m.sizes, np.int64))], parts,
                   axis=int(m.axis))
            values[tops[0]] = parts
            continue
        if isinstance(m, Pick):  # the part under the top's own name (unless a layer in place rewrites it)
            own = final.get(tops[0]) == f"layers_.{key}"
            values[tops[0]] = g.node("Identity", [values[bottoms[0]][m.i]],
                                     g.value(tops[0] if own else f"{tops[0]}/{layer}"))
            continue
        out_shape = shapes[tops[0]]
        src = [values[b] for b in bottoms]
        top = tops[0]
        is_final = final.get(top) == f"layers_.{key}" and len(tops) == 1
        name = top if is_final else f"{top}/{layer}"
        if isinstance(m, torch.nn.Identity):  # Dropout, Split: the tops are the bottom's value
            if len(tops) == 1 and top not in bottoms:  # a new blob: addressable by its name
                values[top] = g.node("Identity", src[:1], g.value(top), name=top)
            else:
                for t in tops:
                    values[t] = src[0]
            continue
        out = g.value(name)
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):  # the same weight layouts as ONNX's
            wname = g.const(f"{layer}.weight", m.weight.detach().numpy())
            args = [src[0], wname] + ([g.const(f"{layer}.bias", m.bias.detach().numpy())] if m.bias is not None else [])
            ph, pw = m.padding
            g.node("Conv" if isinstance(m, torch.nn.Conv2d) else "ConvTranspose", args, out,
                   kernel_shape=list(m.kernel_size), strides=list(m.stride), pads=[ph, pw, ph, pw],
                   dilations=list(m.dilation), group=m.groups)
        elif isinstance(m, InnerProduct):
            flat = g.node("Flatten", src[:1], g.value(f"{top}/{layer}/flatten"), axis=1)
            args = [flat, g.const(f"{layer}.weight", m.weight.detach().numpy())]
            if m.bias is not None:
                args.append(g.const(f"{layer}.bias", m.bias.detach().numpy()))
            g.node("Gemm", args, out, transB=1)
        elif isinstance(m, torch.nn.LeakyReLU):
            g.node("LeakyRelu", src, out, alpha=float(m.negative_slope))
        elif isinstance(m, torch.nn.ReLU):
            g.node("Relu", src, out)
        elif isinstance(m, torch.nn.Sigmoid):
            g.node("Sigmoid", src, out)
        elif isinstance(m, torch.nn.ELU):
            g.node("Elu", src, out, alpha=float(m.alpha))
        elif isinstance(m, AbsVal):
            g.node("Abs", src, out)
        elif isinstance(m, Power):
            y = src[0]
            if m.scale != 1.0:
                y = g.node("Mul", [y, g.const(f"{layer}.scale", np.array(m.scale, np.float32))],
                           g.value(f"{top}/{layer}/scale"))
            if m.shift != 0.0:
                y = g.node("Add", [y, g.const(f"{layer}.shift", np.array(m.shift, np.float32))],
                           g.value(f"{top}/{layer}/shift"))
            g.node("Pow", [y, g.const(f"{layer}.power", np.array(m.power, np.float32))], out)
        elif isinstance(m, torch.nn.PReLU):
            slope = m.weight.detach().numpy().reshape(-1)
            shape = (1,) if slope.size == 1 else (slope.size,) + (1,) * (len(shapes[bottoms[0]]) - 1)
            g.node("PRelu", [src[0], g.const(f"{layer}.slope", slope.reshape(shape))], out)
        elif isinstance(m, torch.nn.Tanh):
            g.node("Tanh", src, out)
        elif isinstance(m, Pool):
            _pool(g, m, src[0], out, shapes[bottoms[0]], out_shape)
        elif isinstance(m, torch.nn.LocalResponseNorm):
            g.node("LRN", src, out, size=int(m.size), alpha=float(m.alpha), beta=float(m.beta), bias=float(m.k))
        elif isinstance(m, BatchNorm):
            c = shapes[bottoms[0]][0]
            g.node("BatchNormalization",
                   [src[0], g.const(f"{layer}.scale", np.ones(c, np.float32)),
                    g.const(f"{layer}.bias", np.zeros(c, np.float32)),
                    g.const(f"{layer}.mean", m.mean.reshape(-1).numpy()),
                    g.const(f"{layer}.var", m.var.reshape(-1).numpy())], out, epsilon=float(m.eps))
        elif isinstance(m, Scale):
            shape = (1, -1) + (1,) * (len(shapes[bottoms[0]]) - 1)
            gamma = g.const(f"{layer}.gamma", m.gamma.numpy().reshape(shape))
            if m.beta is None:
                g.node("Mul", [src[0], gamma], out)
            else:
                mid = g.node("Mul", [src[0], gamma], g.value(f"{top}/{layer}/mul"))
                g.node("Add", [mid, g.const(f"{layer}.beta", m.beta.numpy().reshape(shape))], out)
        elif isinstance(m, Eltwise):
            _eltwise(g, m, src, out, layer, top)
        elif isinstance(m, Concat):
            g.node("Concat", src, out, axis=int(m.axis))
        elif isinstance(m, Flatten):
            g.node("Flatten", src, out, axis=1)
        elif isinstance(m, Crop):  # the offsets and sizes are known: one Slice over the cropped axes
            axes = list(range(m.axis, len(out_shape) + 1))
            starts = [m.offsets[0] if len(m.offsets) == 1 else m.offsets[a - m.axis] if m.offsets else 0 for a in axes]
            ends = [st + out_shape[a - 1] for st, a in zip(starts, axes)]
            g.node("Slice", [src[0], g.const(f"{layer}.starts", np.array(starts, np.int64)),
                             g.const(f"{layer}.ends", np.array(ends, np.int64)),
                             g.const(f"{layer}.axes", np.array(axes, np.int64))], out)
        elif isinstance(m, Normalize):
            axes = list(range(1, len(out_shape) + 1)) if m.across_spatial else [1]
            sq = g.node("ReduceSumSquare", src[:1], g.value(f"{top}/{layer}/sumsq"), axes=axes, keepdims=1)
            sq = g.node("Add", [sq, g.const(f"{layer}.eps", np.array(m.eps, np.float32))], g.value(f"{top}/{layer}/eps"))
            norm = g.node("Sqrt", [sq], g.value(f"{top}/{layer}/norm"))
            unit = g.node("Div", [src[0], norm], g.value(f"{top}/{layer}/unit"))
            scale = m.scale.numpy().reshape((1, -1) + (1,) * (len(out_shape) - 1))
            g.node("Mul", [unit, g.const(f"{layer}.scale", scale)], out)
        elif isinstance(m, Permute):
            g.node("Transpose", src, out, perm=list(m.order))
        elif isinstance(m, Reshape):  # the shape is known but for the batch: 0 copies it
            g.node("Reshape", [src[0], g.const(f"{layer}.shape", np.array([0, *out_shape], np.int64))], out)
        elif isinstance(m, Softmax):
            g.node("Softmax", src, out, axis=int(m.axis))
        else:  # the Caffe backend's own layer set is covered above; a new one must be added here
            raise DeepvisError(f"layer '{layer}' ({type(m).__name__}) cannot be written as ONNX yet")
        for t in tops:
            values[t] = out
    last_blob = net.steps[-1][2][0]
    last = values[last_blob]
    blob_names = [b for b, _ in net.blob_writers() if b != net.input_blob]
    graph = helper.make_graph(
        g.nodes, os.path.splitext(os.path.basename(prototxt))[0] or "caffe",
        [helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["N", backend.channels, h, w])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["N", *shapes[last_blob]])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="deepvis-repro", producer_version=_version())
    props = {
        "deepvis.channel_order": "BGR" if backend.channels == 3 else "grey", "deepvis.layout": "NCHW",
        "deepvis.mean": json.dumps(_mean_rgb(backend)), "deepvis.input_scale": json.dumps(_input_scale(backend)),
        "deepvis.blobs": json.dumps(blob_names), "deepvis.source_prototxt": os.path.basename(prototxt),
        # a net built only up to backend.until: its last blob's channels are not classes
        "deepvis.cut": json.dumps(bool(net.cut)),
        "deepvis.source_caffemodel": os.path.basename(weights),
        "deepvis.prototxt_sha256": file_sha256(prototxt), "deepvis.caffemodel_sha256": file_sha256(weights),
        **({"deepvis.resize": json.dumps(list(backend.resize))} if backend.resize else {}),
        **(meta or {}),
    }
    for k, v in props.items():
        p = model.metadata_props.add()
        p.key, p.value = k, str(v)
    return model


def _version() -> str:
    try:
        from importlib import metadata

        return metadata.version("deepvis-repro")
    except Exception:
        return "0"


def _mean_rgb(backend):
    """RGB (or grey), 0..255: one value per channel, or a C x H x W list for a mean image."""
    m = backend.mean.detach().cpu().float()
    if m.numel() == backend.channels:
        return [round(float(v), 6) for v in m.reshape(-1)]
    return m.numpy().round(4).tolist()


def _input_scale(backend) -> float:
    return float(getattr(backend, "input_scale", 1.0))


def _pool(g, m, src, out, in_shape, out_shape):
    c, ih, iw = in_shape
    if m.global_:
        if m.max:  # ReduceMax rather than GlobalMaxPool: the same op, which every runtime has
            g.node("ReduceMax", [src], out, axes=[2, 3], keepdims=1)
        else:
            g.node("GlobalAveragePool", [src], out)
        return
    (kh, kw), (sh, sw), (ph, pw) = m.k, m.s, m.p
    oh, pb_h, pe_h = _pool_pads(ih, kh, sh, ph)
    ow, pb_w, pe_w = _pool_pads(iw, kw, sw, pw)
    assert (oh, ow) == tuple(out_shape[1:]), (oh, ow, out_shape)
    attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw])
    if (pb_h, pb_w) == (pe_h, pe_w):
        attrs["pads"] = [pb_h, pb_w, pe_h, pe_w]
    elif any((pb_h, pb_w, pe_h, pe_w)):
        # Caffe rounds the output size up: the end needs more padding than the start. An explicit
        # Pad (zeros before AVE, -inf before MAX) keeps the pooling symmetric for every runtime.
        fill = np.array(0.0 if not m.max else -np.inf, np.float32)
        pads = g.const(f"{out}.pads", np.array([0, 0, pb_h, pb_w, 0, 0, pe_h, pe_w], np.int64))
        src = g.node("Pad", [src, pads, g.const(f"{out}.pad_value", fill)], g.value(f"{out}/padded"), mode="constant")
    if m.max:
        g.node("MaxPool", [src], out, **attrs)
        return
    corr = np.outer(_ave_correction(ih, kh, sh, ph, oh), _ave_correction(iw, kw, sw, pw, ow)).astype(np.float32)
    if np.allclose(corr, 1.0):
        g.node("AveragePool", [src], out, count_include_pad=1, **attrs)
        return
    mid = g.node("AveragePool", [src], g.value(f"{out}/window"), count_include_pad=1, **attrs)
    g.node("Mul", [mid, g.const(f"{out}.divisor_correction", corr.reshape(1, 1, oh, ow))], out)


def _eltwise(g, m, src, out, layer, top):
    if m.op == 0:  # PROD
        op = "Mul"
    elif m.op == 2:  # MAX
        g.node("Max", src, out)
        return
    else:  # SUM, with coefficients
        op = "Add"
        coeff = m.coeff or [1.0] * len(src)
        src = [s if c == 1.0 else g.node("Mul", [s, g.const(f"{layer}.coeff{i}", np.array(c, np.float32))],
                                          g.value(f"{top}/{layer}/coeff{i}")) for i, (s, c) in enumerate(zip(src, coeff))]
    acc = src[0]
    for i, s in enumerate(src[1:], start=1):
        acc = g.node(op, [acc, s], out if i == len(src) - 1 else g.value(f"{top}/{layer}/{i}"))


def write_onnx(model, path: str, check: bool = True) -> None:
    """Checked (onnx.checker, full check), then written atomically: no partial file on failure."""
    import onnx

    if check:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise DeepvisError(f"the converted model fails onnx's checker: {str(e).splitlines()[0][:300]}") from None
    write_bytes(path, model.SerializeToString())
