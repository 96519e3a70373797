"""Layer layouts, decided by tracing the input's geometry through the model (never by guessing
from a shape).

A layer is more than "a tensor whose dim 1 is channels": convnets give channels-first maps, Swin
and Keras exports channels-last maps, a ViT gives tokens (prefix tokens, then a patch grid), a CRNN
a (T, N, C) sequence. To know which axis is which, one forward pass of a probe batch runs under a
``TorchFunctionMode`` that labels every tensor derived from the input: each axis is a list of
*factors* (what it is made of: batch ``N``, features ``C``, rows ``Y``, columns ``X``), and every
torch function the model calls maps its inputs' labels to its outputs' (a convolution keeps N, Y, X
and makes new C; a linear layer makes a new C of the last axis; a reshape splits and merges
factors; a permute reorders them; a cat of unlabelled pieces (a class token, a parameter) in front
of a patch grid makes tokens with that many prefix tokens). A function the tracer does not know
makes its outputs unknown, and a layer whose axes are not all decided is ``unknown``: listed, and
refused by every tool in one line, never drawn.

Every tool reads one canonical view of a decided layer: ``(N, C)`` for vectors, ``(N, C, H, W)``
maps for everything positional (channels-last maps transposed, tokens' patch grid unflattened, a
sequence as a one-row map), and a token layer's prefix tokens as ``(N, C, P)`` beside it.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

#: ``forward(x, ["blocks.3" + PREFIX])``: a token layer's prefix tokens (class, distillation,
#: register tokens) as (N, C, P), beside the patch grid that ``blocks.3`` itself gives.
PREFIX = ":prefix"

# ----- what a layer is ----------------------------------------------------------------------------
#: the layouts a layer can have (README: "Layers have layouts")
KINDS = ("vector", "chw", "hwc", "tokens", "sequence", "unknown")


@dataclass(frozen=True)
class Layout:
    """How one layer's value is laid out. ``axes`` are the raw value's axis roles (without
    reading anything into the sizes): 'N', 'C', 'Y', 'X', 'T' (tokens: prefix tokens then the
    grid, row-major), 'L' (a 1-D sequence of positions); ``grid`` the positions' (rows, columns);
    ``prefix`` the names of a token layer's prefix tokens ('cls', 'dist', 'reg0', ...)."""
    kind: str
    axes: tuple = ()
    channels: int = 0
    grid: tuple | None = None
    prefix: tuple = ()
    reason: str = ""
    #: the raw value's shape without the batch, as the model computes it
    raw: tuple = ()

    @property
    def decided(self) -> bool:
        return self.kind != "unknown"

    @property
    def spatial(self) -> bool:
        return self.kind in ("chw", "hwc", "tokens", "sequence")

    def describe(self) -> str:
        """For the layer table: 'tokens 14x14 + cls', 'channels-last 56x56', 'unknown: ...'."""
        g = f" {self.grid[0]}x{self.grid[1]}" if self.grid else ""
        if self.kind == "tokens":
            return f"tokens{g}" + (f" + {', '.join(self.prefix)}" if self.prefix else "")
        return {"vector": "vector", "chw": f"channels-first{g}", "hwc": f"channels-last{g}",
                "sequence": f"sequence{g}"}.get(self.kind, f"unknown: {self.reason}")

    def canonical_shape(self) -> tuple:
        """The shape (without the batch) of the view every tool reads."""
        if self.kind == "vector":
            return (self.channels,)
        if self.spatial:
            return (self.channels, *self.grid)
        return ()


def canonical(value: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(map, prefix) of a raw layer value: map (N, C) or (N, C, H, W); prefix (N, C, P) for a
    token layer with prefix tokens, else None. Only moves and reshapes: the numbers are the
    model's own."""
    if layout.kind in ("unknown",):
        return value, None
    order = [layout.axes.index("N"), layout.axes.index("C")]
    pos = [i for i, a in enumerate(layout.axes) if a in ("Y", "X", "T", "L")]
    v = value.permute(*order, *pos) if value.dim() == len(order) + len(pos) else value
    n, c = v.shape[:2]
    if layout.kind == "vector":
        return v, None
    if layout.kind in ("chw", "hwc"):
        return v, None
    p = len(layout.prefix)
    flat = v.reshape(n, c, -1)
    grid = flat[:, :, p:].reshape(n, c, *layout.grid)
    return grid, (flat[:, :, :p] if p else None)


# ----- axis labels --------------------------------------------------------------------------------
# An axis is a tuple of factors (tag, size, stride): tag 'N', 'C', 'Y', 'X', 'P' (a prefix piece of
# tokens), 'L' (a 1-D sequence made of unlike parts), '?' (unknown); size the factor's extent;
# stride how many of the tag's finer elements one step of this factor skips (a split factor's
# outer part has stride > 1). Singleton axes have no factors.
UNKNOWN_AXIS = (("?", 0, 1),)


def _merge(factors: list) -> tuple:
    """Adjacent pieces of one tag that were split in order are one factor again."""
    out: list = []
    for f in factors:
        if f[1] == 1 and f[0] != "?":
            continue
        if out and out[-1][0] == f[0] and f[0] not in ("?", "P", "L") and out[-1][2] == f[1] * f[2]:
            out[-1] = (f[0], out[-1][1] * f[1], f[2])
        else:
            out.append(f)
    return tuple(out)


def _size(axis: tuple) -> int:
    """An axis's extent: the product of its factors, except tokens: prefix tokens + the grid."""
    prefix = sum(f[1] for f in axis if f[0] == "P")
    return prefix + math.prod(f[1] for f in axis if f[0] != "P") if prefix else \
        math.prod(f[1] for f in axis) if axis else 1


def reshape_labels(labels: tuple, old: tuple, new: tuple):
    """Labels after a reshape from shape ``old`` to ``new``: factors flattened in order and
    regrouped to the new sizes, splitting a factor where a new axis ends inside it; None where the
    sizes cannot be matched."""
    # an axis of tokens with prefix tokens moves whole (an atom), or not at all
    flat = [f for ax in labels for f in ((("A", _size(ax), ax),) if any(g[0] == "P" for g in ax) else ax)
            if f[1] != 1]
    if any(f[0] == "?" for f in flat):
        return None
    out = []
    i = 0
    for d in new:
        need = int(d)
        ax: list = []
        while need > 1:
            if i >= len(flat):
                return None
            tag, size, stride = flat[i]
            if size <= need and need % size == 0:
                ax.append(flat[i])
                need //= size
                i += 1
            elif size % need == 0 and tag not in ("P", "L", "A"):  # split: the outer part ends this axis
                ax.append((tag, need, stride * (size // need)))
                flat[i] = (tag, size // need, stride)
                need = 1
            else:
                return None
        out.append(ax[0][2] if len(ax) == 1 and ax[0][0] == "A" else
                   UNKNOWN_AXIS if any(f[0] == "A" for f in ax) else _merge(ax))
    if i != len(flat):
        return None
    return tuple(out)


def _role(axis: tuple) -> str:
    """What one axis is, from its factors: N, C, Y, X, T (prefix + grid, or a flattened grid),
    L (a sequence), H (a part of C that is not all of it: attention heads), '' (singleton), '?'."""
    if not axis:
        return ""
    tags = [f[0] for f in axis]
    if "?" in tags:
        return "?"
    if len(axis) == 1:
        tag, _size, stride = axis[0]
        if tag in ("N", "L") and stride == 1:
            return tag
        if tag in ("Y", "X"):  # every stride-th row or column: still rows (a patch merge's)
            return tag
        if tag == "P":
            return "Q"
        if tag == "C":
            return "C" if stride == 1 else "H"
        return "?"
    if all(t == "C" for t in tags):
        return "H"
    if all(t == "P" for t in tags):
        return "Q"  # prefix tokens alone (cut from a token axis)
    if "C" in tags and len(set(tags)) > 1 and set(tags) <= {"C", "Y", "X"}:
        return "C"  # features with positions folded in: a flattened map (an fc's input), a space-to-depth
    grid = [f for f in axis if f[0] in ("Y", "X")]
    if [f[0] for f in grid] == ["Y", "X"] and all(f[2] == 1 for f in grid) \
            and all(t == "P" for t in tags[:len(tags) - 2]) and tags[-2:] == ["Y", "X"]:
        return "T"
    return "?"


def decide(labels: tuple | None, shape: tuple, prefix_names=None) -> Layout:
    """A layer's Layout from the labels of its value (as traced) and its shape."""
    if labels is None:
        return Layout("unknown", reason="its value does not derive from the input along known operations")
    roles = [_role(ax) for ax in labels]
    if "?" in roles:
        return Layout("unknown", reason=f"traced through an operation that hides which axis is which {tuple(shape)}")
    if roles.count("N") != 1:
        return Layout("unknown", reason=f"the batch is mixed with other axes {tuple(shape)}")
    if roles.count("C") != 1:
        why = "attention heads x queries x keys (shown by no tool yet)" if "H" in roles else \
            "no single feature axis"
        return Layout("unknown", reason=f"{why} {tuple(shape)}")
    kept = [(r, i) for i, r in enumerate(roles) if r != ""]
    axes = tuple(r if r else "1" for r in roles)
    c = int(shape[roles.index("C")])
    pos = [r for r, _ in kept if r not in ("N", "C")]
    if not pos:
        # singletons left over from pooling (N, C, 1, 1) are still a vector of channels
        return Layout("vector", axes, c, grid=None) if len(shape) == 2 else \
            Layout("chw", axes, c, grid=(1, 1)) if roles[:2] == ["N", "C"] and len(shape) == 4 else \
            Layout("vector", axes, c)
    if pos == ["Y", "X"]:
        grid = (int(shape[roles.index("Y")]), int(shape[roles.index("X")]))
        first = roles.index("C") < roles.index("Y")
        return Layout("chw" if first else "hwc", axes, c, grid)
    if pos == ["T"]:
        ax = labels[roles.index("T")]
        p = sum(f[1] for f in ax if f[0] == "P")
        gh, gw = ax[-2][1], ax[-1][1]
        names = tuple(prefix_names) if prefix_names and len(prefix_names) == p else _default_prefix(p)
        return Layout("tokens", axes, c, (int(gh), int(gw)), names)
    if len(pos) == 1 and pos[0] in ("Y", "X", "L"):
        n = int(shape[roles.index(pos[0])])
        grid = (n, 1) if pos[0] == "Y" else (1, n)
        return Layout("sequence", axes, c, grid)
    return Layout("unknown", reason=f"positions along {'+'.join(pos)} {tuple(shape)}")


def _default_prefix(p: int) -> tuple:
    if p == 0:
        return ()
    if p == 1:
        return ("cls",)
    return tuple(f"tok{i}" for i in range(p))


# ----- the tracer ---------------------------------------------------------------------------------
def _name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: x.T, x.mT
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name.rstrip("_") if name.endswith("_") and not name.endswith("__") else name


_PRESERVE = {
    "relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "relu6", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "softsign", "prelu", "rrelu", "glu_", "logsigmoid", "tanhshrink",
    "threshold", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm", "local_response_norm", "normalize",
    "softmax", "log_softmax", "contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type", "type_as",
    "detach", "abs", "neg", "__neg__", "__pos__", "exp", "log", "sqrt", "rsqrt", "reciprocal", "erf", "sign",
    "sin", "cos", "square", "clamp", "clip", "clamp_min", "clamp_max", "nan_to_num", "roll", "cumsum",
    "requires_grad", "cpu", "cuda", "pin_memory", "masked_fill", "sigmoid_", "relu_", "floor", "ceil", "round",
    "trunc", "frac", "__abs__", "pow", "__pow__", "fill", "zero", "copy", "dropout_", "hardswish_", "logit",
    "contiguous", "channel_shuffle", "native_channel_shuffle", "bernoulli", "flip",
}
_BINARY = {
    "add", "sub", "mul", "div", "true_divide", "floor_divide", "__add__", "__radd__", "__iadd__", "__sub__",
    "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__",
    "__floordiv__", "maximum", "minimum", "max", "min", "where", "addcmul", "addcdiv", "lerp", "fmod",
    "remainder", "__mod__", "atan2", "hypot", "rsub", "__rpow__", "__ipow__", "pow", "__pow__", "masked_fill",
    "sub_", "add_", "mul_", "div_", "copysign", "xlogy", "mul", "__and__", "eq", "ne", "gt", "lt", "ge", "le",
}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "median",
           "nanmean", "nansum", "argmax", "argmin", "all", "any", "count_nonzero"}
_POOL = {"max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
         "adaptive_max_pool1d", "adaptive_max_pool2d", "max_pool2d_with_indices", "max_pool1d_with_indices",
         "adaptive_max_pool2d_with_indices", "lp_pool1d", "lp_pool2d", "interpolate", "upsample",
         "upsample_nearest", "upsample_bilinear", "pad", "fractional_max_pool2d"}
#: made from a tensor's type or shape, not its values: constants (Swin's attention mask)
_CONSTANT = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like",
             "full_like", "empty_like", "rand_like", "randn_like", "randint_like", "new_empty_strided"}
_NONTENSOR = {"size", "dim", "numel", "__len__", "__format__", "__bool__", "item", "tolist", "__index__",
              "shape", "dtype", "device", "is_floating_point", "element_size", "stride", "__repr__",
              "data_ptr", "is_contiguous", "storage_offset", "__hash__", "__eq__", "__int__", "__float__",
              "_has_compatible_shallow_copy_type", "__setstate__", "__reduce_ex__", "nelement", "ndim",
              "requires_grad", "grad_fn", "is_leaf", "__iter__", "untyped_storage", "get_device"}


class _Tracer(TorchFunctionMode):
    """Labels every tensor derived from the probe's input; see the module's docstring."""

    def __init__(self):
        super().__init__()
        # id -> (weak reference, labels): tensors compare elementwise, so no dict can key them
        self.labels: dict[int, tuple] = {}
        self.unknown_ops: list[str] = []

    def get(self, t):
        if isinstance(t, torch.Tensor):
            entry = self.labels.get(id(t))
            if entry is not None and entry[0]() is t:
                return entry[1]
        return None

    def set(self, t, lab):
        if isinstance(t, torch.Tensor) and lab is not None:
            if len(lab) != t.dim():
                lab = tuple(UNKNOWN_AXIS for _ in range(t.dim()))
            self.labels[id(t)] = (weakref.ref(t), lab)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        outs = out if isinstance(out, (tuple, list)) else [out]
        if name in _NONTENSOR or not any(isinstance(o, torch.Tensor) for o in outs):
            return out
        tensors = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor)]
        if name in _CONSTANT or not any(self.get(t) is not None for t in tensors):
            return out  # constants, parameters, masks: no label, neutral in arithmetic
        try:
            labs = self._rule(name, func, args, kwargs, out)
        except Exception:  # a rule that does not fit the call: unknown, never a wrong label
            labs = None
        if labs is None:
            self.unknown_ops.append(name)
            for o in outs:
                if isinstance(o, torch.Tensor):
                    self.set(o, tuple(UNKNOWN_AXIS for _ in range(o.dim())))
        elif isinstance(out, (tuple, list)) and isinstance(labs, list):
            for o, lab in zip(outs, labs):
                self.set(o, lab)
        else:
            self.set(outs[0], labs)
        return out

    # -- the rules: labels of the output(s) ---------------------------------------------------------
    def _rule(self, name, func, args, kwargs, out):
        x = args[0] if args else next(iter(kwargs.values()))
        lx = self.get(x)
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        if name in _PRESERVE or name in ("__setitem__",):
            if lx is None:  # e.g. torch.where(mask, x, y) with an unlabelled first argument
                return self._broadcast([a for a in _flat(args) if isinstance(a, torch.Tensor)], out)
            if isinstance(out, tuple):
                return [lx if isinstance(o, torch.Tensor) and o.dim() == len(lx) else None for o in out]
            return _resize(lx, out.shape) if isinstance(out, torch.Tensor) and out.dim() == len(lx) else None
        if name in _BINARY and not (name in ("max", "min") and _has_dim(args, kwargs)):
            return self._broadcast([a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor)], out)
        if name in _REDUCE:
            return self._reduce(lx, x, args, kwargs, out)
        if name in ("linear", "addmm_linear"):
            # features, or features with the pixels of a neighbourhood (a patch merge's space-to-depth)
            return lx[:-1] + (_new_c(out.shape[-1]),) if _features(lx[-1]) else lx[:-1] + (UNKNOWN_AXIS,)
        if name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
            if x.dim() < 3 or not _features(lx[1]):
                return None
            return (lx[0], _new_c(out.shape[1])) + tuple(_resize1(a, s) for a, s in zip(lx[2:], out.shape[2:]))
        if name in _POOL:
            o = out[0] if isinstance(out, tuple) else out
            lab = tuple(_resize1(a, s) for a, s in zip(lx, o.shape))
            return [lab, None] if isinstance(out, tuple) else lab
        if name in ("view", "reshape", "view_as", "reshape_as"):
            return reshape_labels(lx, shape, tuple(out.shape))
        if name in ("flatten",):
            return reshape_labels(lx, shape, tuple(out.shape))
        if name in ("unflatten",):
            return reshape_labels(lx, shape, tuple(out.shape))
        if name in ("squeeze", "unsqueeze"):
            return reshape_labels(lx, shape, tuple(out.shape))
        if name in ("permute",):
            dims = args[1:] if len(args) > 2 or not isinstance(args[1] if len(args) > 1 else None, (list, tuple)) \
                else args[1]
            dims = kwargs.get("dims", dims)
            return tuple(lx[int(d) % len(lx)] for d in dims)
        if name in ("transpose", "swapaxes", "swapdims", "t", "T", "mT"):
            if name in ("t", "T") and len(lx) <= 2:
                return tuple(reversed(lx))
            a, b = (-2, -1) if name in ("mT",) else (args[1], args[2]) if len(args) > 2 else \
                (kwargs.get("dim0"), kwargs.get("dim1"))
            lab = list(lx)
            a, b = int(a) % len(lab), int(b) % len(lab)
            lab[a], lab[b] = lab[b], lab[a]
            return tuple(lab)
        if name == "movedim":
            src = args[1] if len(args) > 1 else kwargs["source"]
            dst = args[2] if len(args) > 2 else kwargs["destination"]
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            order = [None] * len(lx)
            src = [s % len(lx) for s in src]
            dst = [d % len(lx) for d in dst]
            for s, d in zip(src, dst):
                order[d] = s
            rest = iter(i for i in range(len(lx)) if i not in src)
            order = [o if o is not None else next(rest) for o in order]
            return tuple(lx[i] for i in order)
        if name in ("expand", "expand_as", "broadcast_to"):
            return tuple(UNKNOWN_AXIS if s != 1 and (a == () or _size(a) == 1) and s > 1 else a
                         for a, s in zip((((),) * (out.dim() - len(lx))) + lx, out.shape))
        if name == "__getitem__":
            return self._getitem(lx, x, args[1], out)
        if name in ("index_select",):  # some channels, in some order (a BGR swap): still channels
            d = int(args[1] if len(args) > 1 else kwargs["dim"]) % len(lx)
            return lx[:d] + (_new_c(out.shape[d]) if _role(lx[d]) == "C" else UNKNOWN_AXIS,) + lx[d + 1:]
        if name in ("select",):
            d = int(args[1] if len(args) > 1 else kwargs["dim"]) % len(lx)
            return lx[:d] + lx[d + 1:]
        if name in ("narrow",):
            d = int(args[1]) % len(lx)
            return lx[:d] + (_resize1(lx[d], out.shape[d]),) + lx[d + 1:]
        if name in ("unbind",):
            d = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % len(lx)
            return [lx[:d] + lx[d + 1:] for _ in out]
        if name in ("chunk", "split", "tensor_split", "split_with_sizes"):
            d = int(args[2] if len(args) > 2 else kwargs.get("dim", 0)) % len(lx)
            return [lx[:d] + (_part(lx[d], o.shape[d]),) + lx[d + 1:] for o in out]
        if name == "stack":
            seq = list(args[0] if args else kwargs["tensors"])
            d = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.dim()
            labs = [self.get(t) for t in seq]
            if any(l is None or l != labs[0] for l in labs):
                return None
            lab = labs[0]
            # stacking pieces of features (a rotary embedding's halves) adds a feature piece
            if d > 0 and _role(lab[d - 1]) in ("C", "H"):
                return lab[:d] + ((("C", len(seq), 1),),) + lab[d:]
            return lab[:d] + (UNKNOWN_AXIS,) + lab[d:]  # a new axis (reduced away by Caffe's Eltwise max)
        if name in ("cat", "concat", "concatenate"):
            return self._cat(args, kwargs, out)
        if name in ("matmul", "__matmul__", "bmm"):
            return self._matmul(args[0], args[1], out)
        if name == "baddbmm":
            return self._matmul(args[1], args[2], out)
        if name == "scaled_dot_product_attention":
            q, v = args[0], args[2] if len(args) > 2 else kwargs["value"]
            lq, lv = self.get(q), self.get(v)
            if lq is None:
                return None
            return lq[:-1] + ((lv[-1],) if lv is not None else (_new_c(out.shape[-1]),))
        if name == "multi_head_attention_forward":
            lq = self.get(args[0])
            return [lq, None]
        if name in ("embedding",):
            return None
        return None

    def _broadcast(self, tensors, out):
        if not isinstance(out, torch.Tensor):
            return None
        nd = out.dim()
        res = []
        for k in range(nd):
            chosen = None
            for t in tensors:
                lab = self.get(t)
                j = k - (nd - t.dim())
                if j < 0:
                    continue
                if lab is None:
                    if t.shape[j] not in (1, out.shape[k]):
                        return None
                    continue
                ax = lab[j]
                if t.shape[j] == 1 and out.shape[k] != 1:
                    continue
                if chosen is None:
                    chosen = ax
                elif chosen != ax:
                    chosen = UNKNOWN_AXIS
            res.append(chosen if chosen is not None else (() if out.shape[k] == 1 else UNKNOWN_AXIS))
        return tuple(res)

    def _reduce(self, lx, x, args, kwargs, out):
        dim = args[1] if len(args) > 1 and not isinstance(args[1], bool) else kwargs.get("dim", kwargs.get("axis"))
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        if dim is None:
            return None if isinstance(out, tuple) else ()
        dims = {int(d) % len(lx) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        lab = tuple(() if i in dims else a for i, a in enumerate(lx)) if keep else \
            tuple(a for i, a in enumerate(lx) if i not in dims)
        return [lab, lab] if isinstance(out, tuple) else lab

    def _getitem(self, lx, x, idx, out):
        if isinstance(idx, list) and all(isinstance(i, (slice, int)) or i is Ellipsis for i in idx):
            idx = tuple(idx)  # onnx2torch's Slice indexes with a list of slices
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, torch.Tensor) or isinstance(i, list) for i in idx):
            return None
        if any(i is None for i in idx):
            return None
        if Ellipsis in idx:
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (len(lx) - len(idx) + 1) + idx[k + 1:]
        idx = idx + (slice(None),) * (len(lx) - len(idx))
        res = []
        for ax, i, size in zip(lx, idx, x.shape):
            if isinstance(i, int):
                continue
            start, stop, step = i.indices(size)
            n = len(range(start, stop, step))
            if n == size:
                res.append(ax)
            elif _role(ax) == "T" and step == 1 and stop == size:  # tokens: dropping prefix tokens
                kept = list(ax)
                drop = start
                while drop and kept and kept[0][0] == "P":
                    f = kept.pop(0)
                    if f[1] > drop:
                        kept.insert(0, ("P", f[1] - drop, 1))
                        drop = 0
                    else:
                        drop -= f[1]
                res.append(tuple(kept) if drop == 0 else UNKNOWN_AXIS)
            elif _role(ax) == "T" and step == 1 and start == 0 and n == sum(f[1] for f in ax if f[0] == "P"):
                res.append(tuple(f for f in ax if f[0] == "P"))  # the prefix tokens alone
            elif _role(ax) in ("Y", "X", "C", "L"):  # a window of rows, every 2nd column (Swin's merge)
                res.append(((ax[0][0], n, 1),))
            else:
                res.append(UNKNOWN_AXIS)
        return tuple(res)

    def _cat(self, args, kwargs, out):
        seq = list(args[0] if args else kwargs["tensors"])
        d = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
        d = int(d) % out.dim()
        labs = [self.get(t) for t in seq]
        ref = next(l for l in labs if l is not None)
        other = tuple(a for i, a in enumerate(ref) if i != d)
        for l in labs:
            if l is not None and tuple(a for i, a in enumerate(l) if i != d) != other:
                return None
        pieces = [(l[d] if l is not None else None, t.shape[d]) for l, t in zip(labs, seq)]
        roles = [None if a is None else _role(a) for a, _ in pieces]
        if all(r in ("C", "H") for r in roles):
            ax = (("C", int(out.shape[d]), 1),)
        elif roles[-1] == "T" and all(r in (None, "Q") for r in roles[:-1]):
            # unlabelled pieces (a class token, register tokens) before a grid of patches, or the
            # prefix tokens cut off and put back (EVA's rotary embedding skips them)
            ax = tuple(("P", int(s), 1) for _, s in pieces[:-1]) + pieces[-1][0]
        elif all(r in ("T", "L", "Y", "X") for r in roles):
            ax = (("L", int(out.shape[d]), 1),)
        else:
            return None
        return ref[:d] + (ax,) + ref[d + 1:]

    def _matmul(self, a, b, out):
        la, lb = self.get(a), self.get(b)
        if a.dim() < 2 or b.dim() < 2:
            return None
        if lb is None:  # x @ W: the last axis becomes new features
            return la[:-1] + (_new_c(out.shape[-1]),) if _role(la[-1]) in ("C", "H") else None
        if la is None:
            return None
        nd = out.dim()
        batch = []
        for k in range(nd - 2):
            ja, jb = k - (nd - a.dim()), k - (nd - b.dim())
            ax = la[ja] if ja >= 0 and a.shape[ja] != 1 else lb[jb] if jb >= 0 else ()
            batch.append(ax)
        return tuple(batch) + (la[-2], lb[-1])


def _flat(seq) -> list:
    out = []
    for a in seq:
        if isinstance(a, (list, tuple)):
            out += _flat(a)
        else:
            out.append(a)
    return out


def _has_dim(args, kwargs) -> bool:
    return (len(args) > 1 and isinstance(args[1], int)) or "dim" in kwargs


def _features(ax: tuple) -> bool:
    """An axis a layer can read as its input features: features, or features and a neighbourhood's
    pixels folded in (space-to-depth), never the batch or positions alone."""
    tags = {f[0] for f in ax}
    return not ax or ("C" in tags and tags <= {"C", "Y", "X"})


def _new_c(size) -> tuple:
    return (("C", int(size), 1),) if int(size) != 1 else ()


def _part(ax: tuple, size) -> tuple:
    role = _role(ax)
    if role in ("C", "H"):
        return _new_c(size)
    return ax if _size(ax) == size else UNKNOWN_AXIS


def _resize1(ax: tuple, size) -> tuple:
    """An axis that keeps its meaning at a new extent (a strided convolution's rows, a pooled map)."""
    if _size(ax) == size:
        return ax
    role = _role(ax)
    if role in ("Y", "X", "C", "L") and int(size) >= 1:
        return ((ax[0][0], int(size), 1),)
    if role == "" and size == 1:
        return ax
    return UNKNOWN_AXIS


def _resize(lab: tuple, shape) -> tuple:
    return tuple(_resize1(a, s) for a, s in zip(lab, shape))


@dataclass
class Trace:
    """What one probe found: each hooked module's output labels and shape."""
    labels: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    unknown_ops: list = field(default_factory=list)


def input_labels(x: torch.Tensor) -> tuple:
    """The contract's x: (N, C, H, W)."""
    n, c, h, w = x.shape
    return ((("N", n, 1),), (("C", c, 1),), (("Y", h, 1),) if h > 1 else (), (("X", w, 1),) if w > 1 else ())


def trace(run, x: torch.Tensor, modules: dict) -> Trace:
    """Run ``run(x)`` (the backend's own forward from the contract's x) under the tracer, with
    hooks on ``modules`` ({layer: submodule}); return each layer's output labels. The probe's
    batch must be 2 or more (a batch of 1 is a singleton axis, indistinguishable from others)."""
    tracer = _Tracer()
    result = Trace()

    def hook(layer):
        def fn(_m, _i, output):
            o = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(o, torch.Tensor):
                if layer in result.shapes:  # called twice: which call would a name mean?
                    result.labels[layer] = None
                    return
                result.labels[layer] = tracer.get(o)
                result.shapes[layer] = tuple(o.shape)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    x = x.detach().clone()
    try:
        # the probe's own warnings (a converter's deprecation notes) are the real passes' to give
        with warnings.catch_warnings(), tracer:
            warnings.simplefilter("ignore")
            tracer.set(x, input_labels(x))
            run(x)
    finally:
        for h in handles:
            h.remove()
    result.unknown_ops = sorted(set(tracer.unknown_ops))
    return result
