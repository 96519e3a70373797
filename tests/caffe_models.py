"""Caffe models built in the tests (random weights) and an independent numpy reference of
Caffe's layer semantics, written from Caffe's own definitions, not from the converter."""
from __future__ import annotations

import math

import numpy as np
from google.protobuf import text_format

from deepvis_repro_backends import caffe_proto

# A layer: (name, type, bottoms, tops, params dict, blob shapes)


def caffenet_shaped(c=(16, 24, 32, 32, 24), fc=(64, 64, 10), size=69, conv1=(7, 2)):
    """CaffeNet's structure, scaled down: grouped convolutions, LRN, ceil-mode max pooling,
    in-place ReLU and Dropout, InnerProduct, Softmax. 69 px makes every pooling's ceil matter.
    conv1: (kernel, stride); CaffeNet's own is (11, 4) at 227 px."""
    L = [("conv1", "Convolution", ["data"], ["conv1"], dict(num_output=c[0], kernel_size=conv1[0], stride=conv1[1]), None),
         ("relu1", "ReLU", ["conv1"], ["conv1"], {}, None),
         ("pool1", "Pooling", ["conv1"], ["pool1"], dict(pool="MAX", kernel_size=3, stride=2), None),
         ("norm1", "LRN", ["pool1"], ["norm1"], dict(local_size=5, alpha=0.0001, beta=0.75), None),
         ("conv2", "Convolution", ["norm1"], ["conv2"], dict(num_output=c[1], pad=2, kernel_size=5, group=2), None),
         ("relu2", "ReLU", ["conv2"], ["conv2"], {}, None),
         ("pool2", "Pooling", ["conv2"], ["pool2"], dict(pool="MAX", kernel_size=3, stride=2), None),
         ("norm2", "LRN", ["pool2"], ["norm2"], dict(local_size=5, alpha=0.0001, beta=0.75), None),
         ("conv3", "Convolution", ["norm2"], ["conv3"], dict(num_output=c[2], pad=1, kernel_size=3), None),
         ("relu3", "ReLU", ["conv3"], ["conv3"], {}, None),
         ("conv4", "Convolution", ["conv3"], ["conv4"], dict(num_output=c[3], pad=1, kernel_size=3, group=2), None),
         ("relu4", "ReLU", ["conv4"], ["conv4"], {}, None),
         ("conv5", "Convolution", ["conv4"], ["conv5"], dict(num_output=c[4], pad=1, kernel_size=3, group=2), None),
         ("relu5", "ReLU", ["conv5"], ["conv5"], {}, None),
         ("pool5", "Pooling", ["conv5"], ["pool5"], dict(pool="MAX", kernel_size=3, stride=2), None),
         ("fc6", "InnerProduct", ["pool5"], ["fc6"], dict(num_output=fc[0]), None),
         ("relu6", "ReLU", ["fc6"], ["fc6"], {}, None),
         ("drop6", "Dropout", ["fc6"], ["fc6"], dict(dropout_ratio=0.5), None),
         ("fc7", "InnerProduct", ["fc6"], ["fc7"], dict(num_output=fc[1]), None),
         ("relu7", "ReLU", ["fc7"], ["fc7"], {}, None),
         ("drop7", "Dropout", ["fc7"], ["fc7"], dict(dropout_ratio=0.5), None),
         ("fc8", "InnerProduct", ["fc7"], ["fc8"], dict(num_output=fc[2]), None),
         ("prob", "Softmax", ["fc8"], ["prob"], {}, None)]
    return L, size


def caffenet_geometry(c=(8, 16, 24, 24, 16), fc=(32, 32, 10)):
    """The paper's CaffeNet exactly as its deploy prototxt (kernels, strides, pads, groups, 227
    px), with fewer channels: the same receptive fields at a fraction of the weights."""
    return caffenet_shaped(c, fc, size=227, conv1=(11, 4))


def resnet_shaped(size=32):
    """ResNet's structure: BatchNorm + Scale, Eltwise sums, a projection shortcut, an identity
    block, padded average pooling (ceil mode), InnerProduct."""
    def conv_bn(name, bottom, n, k, s=1, p=0, relu=True):
        out = [(name, "Convolution", [bottom], [name], dict(num_output=n, kernel_size=k, stride=s, pad=p, bias_term=False), None),
               (f"bn_{name}", "BatchNorm", [name], [name], {}, None),
               (f"scale_{name}", "Scale", [name], [name], dict(bias_term=True), None)]
        if relu:
            out.append((f"{name}_relu", "ReLU", [name], [name], {}, None))
        return out
    L = conv_bn("conv1", "data", 16, 3, 1, 1)
    L += conv_bn("res2a_branch1", "conv1", 24, 1, 2, 0, relu=False)
    L += conv_bn("res2a_branch2a", "conv1", 24, 3, 2, 1)
    L += conv_bn("res2a_branch2b", "res2a_branch2a", 24, 3, 1, 1, relu=False)
    L += [("res2a", "Eltwise", ["res2a_branch1", "res2a_branch2b"], ["res2a"], {}, None),
          ("res2a_relu", "ReLU", ["res2a"], ["res2a"], {}, None)]
    L += conv_bn("res2b_branch2a", "res2a", 24, 3, 1, 1)
    L += conv_bn("res2b_branch2b", "res2b_branch2a", 24, 3, 1, 1, relu=False)
    L += [("res2b", "Eltwise", ["res2a", "res2b_branch2b"], ["res2b"], {}, None),
          ("res2b_relu", "ReLU", ["res2b"], ["res2b"], {}, None),
          ("pool", "Pooling", ["res2b"], ["pool"], dict(pool="AVE", kernel_size=3, stride=2, pad=1), None),
          ("fc", "InnerProduct", ["pool"], ["fc"], dict(num_output=10), None),
          ("prob", "Softmax", ["fc"], ["prob"], {}, None)]
    return L, size


def mixed_shaped(size=35):
    """Every other layer type the Caffe backend supports: Split, two branches Concat-ed,
    Eltwise PROD, MAX and SUM with coefficients, LeakyReLU, Sigmoid, TanH, AVE pooling that
    rounds up past the padding, global pooling, Flatten, a Dropout that is not in place."""
    L = [("conv1", "Convolution", ["data"], ["conv1"], dict(num_output=8, kernel_size=3, stride=2, pad=1), None),
         ("leaky1", "ReLU", ["conv1"], ["conv1"], dict(negative_slope=0.1), None),
         ("split1", "Split", ["conv1"], ["conv1_a", "conv1_b"], {}, None),
         ("conv2a", "Convolution", ["conv1_a"], ["conv2a"], dict(num_output=6, kernel_size=3, pad=1), None),
         ("sig2a", "Sigmoid", ["conv2a"], ["conv2a"], {}, None),
         ("conv2b", "Convolution", ["conv1_b"], ["conv2b"], dict(num_output=6, kernel_size=1), None),
         ("tanh2b", "TanH", ["conv2b"], ["conv2b"], {}, None),
         ("prod", "Eltwise", ["conv2a", "conv2b"], ["prod"], dict(operation=0), None),
         ("max", "Eltwise", ["conv2a", "conv2b"], ["max"], dict(operation=2), None),
         ("wsum", "Eltwise", ["prod", "max"], ["wsum"], dict(operation=1, coeff=[0.5, -2.0]), None),
         ("cat", "Concat", ["wsum", "conv2a"], ["cat"], {}, None),
         ("pool", "Pooling", ["cat"], ["pool"], dict(pool="AVE", kernel_size=3, stride=2, pad=1), None),
         ("gpool", "Pooling", ["pool"], ["gpool"], dict(pool="MAX", global_pooling=True), None),
         ("flat", "Flatten", ["gpool"], ["flat"], {}, None),
         ("drop", "Dropout", ["flat"], ["drop"], dict(dropout_ratio=0.5), None),
         ("fc", "InnerProduct", ["drop"], ["fc"], dict(num_output=5), None),
         ("prob", "Softmax", ["fc"], ["prob"], {}, None)]
    return L, size


def activations_shaped(size=29):
    """Caffe's other activation layers, each with its parameters: ELU (alpha), PReLU (per channel
    and channel-shared slopes, learned blobs), AbsVal, Power (power, scale, shift; a positive base
    after AbsVal), in place and not; and a Deconvolution (stride 2, pad 1: 15 -> 30 px)."""
    L = [("conv1", "Convolution", ["data"], ["conv1"], dict(num_output=8, kernel_size=3, stride=2, pad=1), None),
         ("elu1", "ELU", ["conv1"], ["conv1"], dict(alpha=0.7), None),
         ("conv2", "Convolution", ["conv1"], ["conv2"], dict(num_output=6, kernel_size=3, pad=1), None),
         ("prelu2", "PReLU", ["conv2"], ["prelu2"], {}, None),
         ("up", "Deconvolution", ["prelu2"], ["up"], dict(num_output=6, kernel_size=4, stride=2, pad=1), None),
         ("conv3", "Convolution", ["up"], ["conv3"], dict(num_output=6, kernel_size=1), None),
         ("prelu3", "PReLU", ["conv3"], ["conv3"], dict(channel_shared=True), None),
         ("abs3", "AbsVal", ["conv3"], ["abs3"], {}, None),
         ("pow3", "Power", ["abs3"], ["pow3"], dict(power=1.5, scale=0.5, shift=0.25), None),
         ("pool", "Pooling", ["pow3"], ["pool"], dict(pool="MAX", kernel_size=3, stride=2), None),
         ("fc", "InnerProduct", ["pool"], ["fc"], dict(num_output=4), None),
         ("prob", "Softmax", ["fc"], ["prob"], {}, None)]
    return L, size


def shaping_shaped(size=24):
    """Caffe's shaping layers, FCN- and SSD-style: Slice (uneven, along channels: two tops), a
    Deconvolution cropped back to a reference blob's size (Crop, offset 1), SSD's Normalize (per
    position with a scale per channel, and across the whole blob with one shared scale), Permute
    to NHWC, Reshape to (N, -1, 6) with a Softmax along its last axis, then Flatten and a class
    layer."""
    L = [("conv1", "Convolution", ["data"], ["conv1"], dict(num_output=8, kernel_size=3, pad=1), None),
         ("relu1", "ReLU", ["conv1"], ["conv1"], {}, None),
         ("slice1", "Slice", ["conv1"], ["part_a", "part_b"], dict(axis=1, slice_point=[3]), None),
         ("conv_a", "Convolution", ["part_a"], ["conv_a"], dict(num_output=6, kernel_size=3, pad=1), None),
         ("conv_b", "Convolution", ["part_b"], ["conv_b"], dict(num_output=6, kernel_size=3, pad=1), None),
         ("pool", "Pooling", ["conv_a"], ["pool"], dict(pool="MAX", kernel_size=2, stride=2), None),
         ("up", "Deconvolution", ["pool"], ["up"], dict(num_output=6, kernel_size=4, stride=2), None),
         ("crop", "Crop", ["up", "conv_b"], ["crop"], dict(axis=2, offset=[1]), None),
         ("norm", "Normalize", ["crop"], ["norm"], dict(across_spatial=False, channel_shared=False), None),
         ("norm_b", "Normalize", ["conv_b"], ["norm_b"], dict(across_spatial=True, channel_shared=True), None),
         ("sum", "Eltwise", ["norm", "norm_b"], ["sum"], {}, None),
         ("perm", "Permute", ["sum"], ["perm"], dict(order=[0, 2, 3, 1]), None),
         ("resh", "Reshape", ["perm"], ["resh"], dict(shape=[0, -1, 6]), None),
         ("soft", "Softmax", ["resh"], ["soft"], dict(axis=2), None),
         ("flat", "Flatten", ["soft"], ["flat"], {}, None),
         ("fc", "InnerProduct", ["flat"], ["fc"], dict(num_output=5), None),
         ("prob", "Softmax", ["fc"], ["prob"], {}, None)]
    return L, size


PARAM_FIELD = {"Convolution": "convolution_param", "Deconvolution": "convolution_param", "Pooling": "pooling_param", "LRN": "lrn_param",
               "InnerProduct": "inner_product_param", "Dropout": "dropout_param",
               "Scale": "scale_param", "BatchNorm": "batch_norm_param", "Eltwise": "eltwise_param",
               "ReLU": "relu_param", "ELU": "elu_param", "Power": "power_param", "PReLU": "prelu_param",
               "Slice": "slice_param", "Crop": "crop_param", "Normalize": "norm_param", "Permute": "permute_param",
               "Reshape": "reshape_param", "Softmax": "softmax_param"}


def random_weights(layers, size, seed=0, channels=3):
    """Blobs for every parametric layer, with the shapes Caffe gives them."""
    rng = np.random.default_rng(seed)
    shapes = {"data": (channels, size, size)}
    blobs = {}
    for name, t, bottoms, tops, p, _ in layers:
        c, h, w = shapes[bottoms[0]] if len(shapes[bottoms[0]]) == 3 else (shapes[bottoms[0]][0], 1, 1)
        if t == "Concat":
            c = sum(shapes[b][0] for b in bottoms)
        if t == "Convolution":
            k, s, pad, g = p["kernel_size"], p.get("stride", 1), p.get("pad", 0), p.get("group", 1)
            n = p["num_output"]
            fan = c // g * k * k
            blobs[name] = [rng.normal(0, math.sqrt(2 / fan), (n, c // g, k, k)).astype(np.float32)]
            if p.get("bias_term", True):
                blobs[name].append(rng.normal(0, 0.1, n).astype(np.float32))
            out = (n, (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1)
        elif t == "Deconvolution":
            k, s_, pad = p["kernel_size"], p.get("stride", 1), p.get("pad", 0)
            n = p["num_output"]
            blobs[name] = [rng.normal(0, math.sqrt(1 / (c * k * k)), (c, n, k, k)).astype(np.float32),
                           rng.normal(0, 0.1, n).astype(np.float32)]
            out = (n, (h - 1) * s_ + k - 2 * pad, (w - 1) * s_ + k - 2 * pad)
        elif t == "InnerProduct":
            fan = int(np.prod(shapes[bottoms[0]]))
            n = p["num_output"]
            blobs[name] = [rng.normal(0, math.sqrt(2 / fan), (n, fan)).astype(np.float32),
                           rng.normal(0, 0.1, n).astype(np.float32)]
            out = (n,)
        elif t == "Pooling" and p.get("global_pooling"):
            out = (c, 1, 1)
        elif t == "Pooling":
            k, s, pad = p["kernel_size"], p.get("stride", 1), p.get("pad", 0)
            out = (c, pooled(h, k, s, pad), pooled(w, k, s, pad))
        elif t == "Concat":
            out = (c, h, w)
        elif t == "Flatten":
            out = (int(np.prod(shapes[bottoms[0]])),)
        elif t == "BatchNorm":
            factor = np.float32(rng.uniform(0.5, 2))
            blobs[name] = [rng.normal(0, 0.5, c).astype(np.float32) * factor,
                           rng.uniform(0.5, 2, c).astype(np.float32) * factor, np.array([factor], np.float32)]
            out = shapes[bottoms[0]]
        elif t == "Scale":
            blobs[name] = [rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(0, 0.2, c).astype(np.float32)]
            out = shapes[bottoms[0]]
        elif t == "PReLU":
            blobs[name] = [rng.uniform(0.05, 0.5, 1 if p.get("channel_shared") else c).astype(np.float32)]
            out = shapes[bottoms[0]]
        elif t == "Normalize":
            blobs[name] = [rng.uniform(5, 20, 1 if p.get("channel_shared") else c).astype(np.float32)]
            out = shapes[bottoms[0]]
        elif t == "Slice":  # along channels (axis 1), the only axis these models slice
            edges = [0] + list(p["slice_point"]) + [c]
            for top, a, b in zip(tops, edges, edges[1:]):
                shapes[top] = (b - a,) + tuple(shapes[bottoms[0]][1:])
            continue
        elif t == "Crop":
            axis = p.get("axis", 2)
            out = tuple(shapes[bottoms[0]][:axis - 1]) + tuple(shapes[bottoms[1]][axis - 1:])
        elif t == "Permute":
            full = (1,) + tuple(shapes[bottoms[0]])
            out = tuple(full[i] for i in p["order"])[1:]
        elif t == "Reshape":
            n = int(np.prod(shapes[bottoms[0]]))
            dims = [d for d in p["shape"][1:]]
            known = int(np.prod([d for d in dims if d != -1]))
            out = tuple(n // known if d == -1 else d for d in dims)
        else:
            out = shapes[bottoms[0]]
        for top in tops:
            shapes[top] = out
    return blobs, shapes


def pooled(h, k, s, p):
    """Caffe's pooled size: ceil, then drop a window that would start in the bottom padding."""
    n = int(math.ceil((h + 2 * p - k) / s)) + 1
    if p and (n - 1) * s >= h + p:
        n -= 1
    return n


def write_model(layers, size, blobs, folder, name="net", v1_weights=False, half=False, channels=3):
    """deploy.prototxt (text) and net.caffemodel (binary, weights only), as Caffe writes them;
    half: the blobs in half precision, as OpenCV's shrinkCaffeModel writes them (raw_data, FLOAT16)."""
    net = caffe_proto.NetParameter()
    net.name = name
    inp = net.layer.add()
    inp.name, inp.type = "data", "Input"
    inp.top.append("data")
    inp.input_param.shape.add().dim.extend([1, channels, size, size])
    model = caffe_proto.NetParameter()
    model.name = name
    for lname, t, bottoms, tops, p, _ in layers:
        if v1_weights:  # old caffemodels: 'layers' (V1LayerParameter), enum types, blobs by name
            if lname in blobs:
                v1 = model.layers.add()
                v1.name = lname
                v1.type = {"Convolution": 4, "InnerProduct": 14}[t]
                for b in blobs[lname]:
                    blob = v1.blobs.add()
                    blob.num, blob.channels = (b.shape + (1, 1, 1, 1))[:2] if b.ndim == 4 else (1, 1)
                    if b.ndim == 4:
                        blob.height, blob.width = b.shape[2:]
                    else:  # legacy 4-D shapes: (1, 1, out, in) for weights, (1, 1, 1, n) for biases
                        blob.height, blob.width = (b.shape[0], b.shape[1]) if b.ndim == 2 else (1, b.shape[0])
                    blob.data.extend(b.reshape(-1).tolist())
        for target in ((net,) if v1_weights else (net, model)):
            layer = target.layer.add()
            layer.name, layer.type = lname, t
            layer.bottom.extend(bottoms)
            layer.top.extend(tops)
            if p and t in PARAM_FIELD:
                msg = getattr(layer, PARAM_FIELD[t])
                for k, v in p.items():
                    if k == "pool":
                        msg.pool = {"MAX": 0, "AVE": 1}[v]
                    elif k in ("kernel_size", "stride", "pad") and t in ("Convolution", "Deconvolution"):
                        getattr(msg, k).append(v)
                    elif k in ("coeff", "slice_point", "offset", "order"):
                        getattr(msg, k).extend(v)
                    elif k == "shape":
                        msg.shape.dim.extend(v)
                    else:
                        setattr(msg, k, v)
        for b in ([] if v1_weights else blobs.get(lname, [])):
            blob = model.layer[-1].blobs.add()
            blob.shape.dim.extend(b.shape)
            if half:
                blob.raw_data_type = 2  # FLOAT16
                blob.raw_data = b.astype("<f2").tobytes()
            else:
                blob.data.extend(b.reshape(-1).tolist())
    proto = folder / f"{name}.prototxt"
    proto.write_text(text_format.MessageToString(net))
    weights = folder / f"{name}.caffemodel"
    weights.write_bytes(model.SerializeToString())
    return proto, weights


# ----- the reference: Caffe's definitions in numpy, float64 ------------------------------------
def conv_ref(x, w, b, stride, pad, group):
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((n, o, oh, ow))
    og = o // group
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og]
        for ky in range(k):
            for kx in range(k):
                patch = xs[:, :, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, ky, kx])
    return out + (b.reshape(1, -1, 1, 1) if b is not None else 0)


def deconv_ref(x, w, b, stride, pad):
    """Caffe's Deconvolution (group 1): each input pixel scatters its kernel-weighted copy into
    the output at stride spacing (col2im), then pad pixels are cut from every border."""
    n, c, h, wd = x.shape
    _, o, k, _ = w.shape
    full = np.zeros((n, o, (h - 1) * stride + k, (wd - 1) * stride + k))
    for ky in range(k):
        for kx in range(k):
            full[:, :, ky:ky + stride * (h - 1) + 1:stride, kx:kx + stride * (wd - 1) + 1:stride] += \
                np.einsum("nchw,co->nohw", x, w[:, :, ky, kx])
    out = full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad]
    return out + b.reshape(1, -1, 1, 1)


def pool_ref(x, kind, k, s, p):
    n, c, h, w = x.shape
    oh, ow = pooled(h, k, s, p), pooled(w, k, s, p)
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s - p, j * s - p
            he, we = min(hs + k, h + p), min(ws + k, w + p)
            size = (he - hs) * (we - ws)  # Caffe's AVE divisor: padding counts, overhang does not
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            win = x[:, :, hs:he, ws:we]
            out[:, :, i, j] = win.max((2, 3)) if kind == "MAX" else win.sum((2, 3)) / size
    return out


def lrn_ref(x, size, alpha, beta, k=1.0):
    c = x.shape[1]
    sq = x ** 2
    out = np.empty_like(x)
    half = (size - 1) // 2
    for i in range(c):
        lo, hi = max(0, i - half), min(c, i + half + 1)
        out[:, i] = x[:, i] / (k + alpha / size * sq[:, lo:hi].sum(1)) ** beta
    return out


def reference_blobs(layers, blobs, x):
    """Every blob's final value, by Caffe's rules (in-place layers overwrite their bottom)."""
    vals = {"data": x.astype(np.float64)}
    for name, t, bottoms, tops, p, _ in layers:
        a = vals[bottoms[0]]
        bl = [b.astype(np.float64) for b in blobs.get(name, [])]
        if t == "Convolution":
            y = conv_ref(a, bl[0], bl[1] if len(bl) > 1 else None, p.get("stride", 1), p.get("pad", 0), p.get("group", 1))
        elif t == "Deconvolution":
            y = deconv_ref(a, bl[0], bl[1], p.get("stride", 1), p.get("pad", 0))
        elif t == "ReLU":
            y = np.maximum(a, 0)
        elif t == "ELU":
            alpha = p.get("alpha", 1.0)
            y = np.where(a > 0, a, alpha * (np.exp(np.minimum(a, 0)) - 1))
        elif t == "PReLU":
            slope = bl[0].reshape(1, -1, 1, 1) if bl[0].size > 1 else bl[0].reshape(())
            y = np.maximum(a, 0) + slope * np.minimum(a, 0)
        elif t == "AbsVal":
            y = np.abs(a)
        elif t == "Power":
            y = (p.get("shift", 0.0) + p.get("scale", 1.0) * a) ** p.get("power", 1.0)
        elif t == "Pooling":
            y = pool_ref(a, p["pool"], p["kernel_size"], p.get("stride", 1), p.get("pad", 0))
        elif t == "LRN":
            y = lrn_ref(a, p["local_size"], p["alpha"], p["beta"])
        elif t == "InnerProduct":
            y = a.reshape(len(a), -1) @ bl[0].T + bl[1]
        elif t == "Dropout":
            y = a
        elif t == "Softmax":
            ax = p.get("axis", 1)
            e = np.exp(a - a.max(ax, keepdims=True))
            y = e / e.sum(ax, keepdims=True)
        elif t == "Slice":  # Caffe: the parts between consecutive slice points, one per top
            edges = [0] + list(p["slice_point"]) + [a.shape[1]]
            for top, lo, hi in zip(tops, edges, edges[1:]):
                vals[top] = a[:, lo:hi]
            continue
        elif t == "Crop":  # every axis from `axis` on cut to the reference's size at the offset
            ref, off = vals[bottoms[1]], p.get("offset", [0])[0]
            index = tuple(slice(None) if i < p.get("axis", 2) else slice(off, off + ref.shape[i])
                          for i in range(a.ndim))
            y = a[index]
        elif t == "Normalize":  # SSD: x / sqrt(sum of squares + eps) * scale
            over = tuple(range(1, a.ndim)) if p.get("across_spatial", True) else (1,)
            y = a / np.sqrt((a * a).sum(over, keepdims=True) + 1e-10)
            y = y * (bl[0].reshape(1, -1, 1, 1) if bl[0].size > 1 else bl[0].reshape(()))
        elif t == "Permute":
            y = a.transpose(p["order"])
        elif t == "Reshape":
            y = a.reshape([len(a)] + list(p["shape"][1:]))
        elif t == "Flatten":
            y = a.reshape(len(a), -1)
        elif t == "BatchNorm":
            f = bl[2][0]
            y = (a - (bl[0] / f).reshape(1, -1, 1, 1)) / np.sqrt((bl[1] / f).reshape(1, -1, 1, 1) + 1e-5)
        elif t == "Scale":
            y = a * bl[0].reshape(1, -1, 1, 1) + bl[1].reshape(1, -1, 1, 1)
        elif t == "Eltwise":
            y = sum(vals[b] for b in bottoms)
        else:
            raise AssertionError(t)
        for top in tops:
            vals[top] = y
    return vals


def model_files(shape, seed, folder, channels=3):
    """(layers, size, blobs, prototxt path, caffemodel path) of a net of the given shape (a
    function returning (layers, size)) with random weights, written into folder; channels: the
    input's (1: a grey net)."""
    layers, size = shape()
    blobs, _ = random_weights(layers, size, seed=seed, channels=channels)
    proto, weights = write_model(layers, size, blobs, folder, channels=channels)
    return layers, size, blobs, proto, weights
