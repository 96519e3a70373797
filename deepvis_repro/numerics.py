"""Portable numerics: the same bits from an optimization on any x86-64 CPU, any thread count.

Why: gradient ascent amplifies the last bit of a float within tens of steps, so a convolution
that rounds differently (oneDNN picks another algorithm for another thread count or CPU, MKL
another kernel) ends in another image. Measured on the embedded model: 1 vs 2 threads gave
different images after 20 steps; the reason was oneDNN's 1x1 convolutions, whose reduction order
changes with the thread count.

How: every reduction the network does is given one fixed order, written down as a *spec*, and a
fast library kernel is used only where it is verified, bit for bit, to follow that spec:

- matrix products (1x1 convolutions, other convolutions as im2col + product, linear layers, and
  their input gradients): the sum over k runs in blocks of ``BLOCK`` (64), each block a sequential
  fused multiply-add chain k = 0, 1, ... from zero, the blocks added in order. MKL's sgemm follows
  that spec for most shapes; each (M, K, N, threads) is checked once against a plain chain of
  ``addcmul`` and, where it differs (small M, say), the chain itself is used;
- depthwise convolutions (and the optimizer's separable blur): for each output, the taps
  (i, j) in row-major order as a fused multiply-add chain from zero; the input gradient likewise,
  taps in row-major order. oneDNN's kernels follow it here; each geometry is checked once;
- global average pooling: a pairwise tree of plain additions.

Everything else a network does on the embedded model is elementwise (one rounding per value on
every CPU). Reductions this module does not make portable (softmax, LRN, average pools of other
sizes, ...) still run natively and are *named* in the run's record (``report()``), so a user
knows when the promise does not cover a model.

The spec assumes an x86-64 CPU with FMA (every x86-64 CPU since 2013/2015 that PyTorch's AVX2
kernels run on); ATen's scalar build (``ATEN_CPU_CAPABILITY=default``) rounds without FMA, and so
do GPUs in their own ways: there the harness compares images by its calibrated rounding
criterion instead of by bits (reproduce/compare.py).
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .bf16 import autocast_bf16, runs_bf16
from .errors import DeepvisError

#: Length of one sequential multiply-add chain in a matrix product (see the module's doc).
BLOCK = 64

_lock = threading.Lock()
_verified: dict[tuple, bool] = {}
_spec_only = False


@contextlib.contextmanager
def spec_only():
    """Inside: no library kernel at all, only the spec's own implementations (slow). What runs
    under it is what any machine computes; the tests check that the fast path equals it."""
    global _spec_only
    before, _spec_only = _spec_only, True
    try:
        yield
    finally:
        _spec_only = before


def _verify(key: tuple, check) -> bool:
    """check() once per key (shape, geometry, thread count): is the fast kernel the spec?"""
    if _spec_only:
        return False
    with _lock:
        if key not in _verified:
            with torch.no_grad():
                _verified[key] = bool(check())
        return _verified[key]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _rand(shape, seed, like: torch.Tensor) -> torch.Tensor:
    """Random values of a shape, on like's device and dtype, in like's memory format."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(device=like.device, dtype=like.dtype)
    return t.contiguous(memory_format=torch.channels_last) if _cl(like) else t


def _cl(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


# ----- matrix products --------------------------------------------------------------------------


def chain_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The spec of one block: acc = fma(a[:, k], b[k, :], acc) for k = 0 .. K-1 from zero, then
    out + acc (one rounding) when a running sum is given."""
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    for k in range(a.shape[1]):
        acc.addcmul_(a[:, k:k + 1], b[k:k + 1, :])
    return acc if out is None else out + acc


def _like(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Random values in a tensor of t's shape, strides and dtype (kernels choose by layout)."""
    r = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    g = torch.Generator().manual_seed(seed)
    return r.copy_(torch.randn(t.shape, generator=g).to(t.device))


def _padded(a, b, out):
    m = a.shape[0]
    rows = max(16, -(-m // 16) * 16)
    ap = torch.cat([a, a.new_zeros(rows - m, a.shape[1])])
    if out is not None and out.dim() == 2:
        out = torch.cat([out, out.new_zeros(rows - m, out.shape[1])])
    return (ap @ b if out is None else torch.addmm(out, ap, b))[:m]


def _fast_block(a, b, out):
    """MKL for one block, in the first verified form: out + a @ b as one addmm (the running sum
    then costs no extra pass), as a @ b, or through the transpose; None where none is the spec."""
    key = ("mm", tuple(a.shape), a.stride(), tuple(b.shape), b.stride(),
           None if out is None else tuple(out.shape), a.dtype, torch.get_num_threads())
    forms = {
        "addmm": lambda a, b, o: torch.addmm(o, a, b) if o is not None else a @ b,
        "mm": lambda a, b, o: a @ b if o is None else o + a @ b,
        "mmT": lambda a, b, o: (b.t() @ a.t()).t() if o is None else o + (b.t() @ a.t()).t(),
        # MKL takes another kernel for a few rows (M < 16 here): zero rows make it the usual one
        "pad16": lambda a, b, o: _padded(a, b, o),
    }
    for name, form in forms.items():
        def check(form=form):
            ra, rb = _like(a, 1), _like(b, 2)
            ro = None if out is None else _like(out, 3)
            return _same_bits(form(ra, rb, ro), chain_matmul(ra, rb, ro))
        if _verify(key + (name,), check):
            return form(a, b, out)
    return None


def block_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) @ (K, N) (+ bias (N,)) under the spec: the running sum starts at the bias (none:
    the first block), then each block's chain of BLOCK is added in order."""
    out = bias
    for k0 in range(0, a.shape[1], BLOCK):
        ab, bb = a[:, k0:k0 + BLOCK], b[k0:k0 + BLOCK]
        fast = _fast_block(ab, bb, out)
        out = fast if fast is not None else chain_matmul(ab, bb, out)
    return out


class _Matmul(torch.autograd.Function):
    """a @ b with both products of the backward pass under the same spec."""

    @staticmethod
    def forward(ctx, a, b, bias):
        ctx.save_for_backward(a, b)
        return block_matmul(a, b, bias)

    @staticmethod
    def backward(ctx, gy):
        a, b = ctx.saved_tensors
        ga = block_matmul(gy, b.t()) if ctx.needs_input_grad[0] else None
        gb = block_matmul(a.t(), gy) if ctx.needs_input_grad[1] else None
        gbias = tree_sum(gy, 0) if ctx.needs_input_grad[2] else None
        return ga, gb, gbias


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _Matmul.apply(a, b, bias)


# ----- depthwise convolution --------------------------------------------------------------------


def _taps(h, w, kh, kw, stride, dilation):
    """Output size and, per tap (i, j) in row-major order, the input slices it reads."""
    oh = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    taps = [(i, j, slice(i * dilation[0], i * dilation[0] + (oh - 1) * stride[0] + 1, stride[0]),
             slice(j * dilation[1], j * dilation[1] + (ow - 1) * stride[1] + 1, stride[1]))
            for i in range(kh) for j in range(kw)]
    return oh, ow, taps


def _empty(shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last if _cl(like) else torch.contiguous_format)


def taps_depthwise(xp: torch.Tensor, w: torch.Tensor, stride, dilation) -> torch.Tensor:
    """The forward spec on an already padded input; w is (C, kh, kw)."""
    n, c, h, wd = xp.shape
    oh, ow, taps = _taps(h, wd, w.shape[1], w.shape[2], stride, dilation)
    y = _empty((n, c, oh, ow), xp).zero_()
    for i, j, si, sj in taps:
        y.addcmul_(xp[:, :, si, sj], w[:, i, j].view(1, c, 1, 1))
    return y


def taps_depthwise_input_grad(gy: torch.Tensor, w: torch.Tensor, padded_shape, stride, dilation,
                              like) -> torch.Tensor:
    """The backward spec: each tap's share scattered into the padded input, taps in order."""
    n, c, h, wd = padded_shape
    _, _, taps = _taps(h, wd, w.shape[1], w.shape[2], stride, dilation)
    gp = _empty(padded_shape, like).zero_()
    for i, j, si, sj in taps:
        gp[:, :, si, sj].addcmul_(gy, w[:, i, j].view(1, c, 1, 1))
    return gp


class _Depthwise(torch.autograd.Function):
    """Depthwise convolution (one filter per channel) on a padded input, under the spec; oneDNN
    where it is verified to be the spec for this geometry and thread count."""

    @staticmethod
    def forward(ctx, xp, w, stride, dilation):
        c, kh, kw = w.shape
        key = ("dw", tuple(xp.shape), (kh, kw), stride, dilation, _cl(xp), xp.dtype, torch.get_num_threads())
        w4 = w.view(c, 1, kh, kw)

        def check_fwd():
            rx, rw = _rand(xp.shape, 3, xp), _rand(w.shape, 4, w)
            return _same_bits(F.conv2d(rx, rw.view(c, 1, kh, kw), None, stride, 0, dilation, c),
                              taps_depthwise(rx, rw, stride, dilation))

        if _verify(key + ("fwd",), check_fwd):
            y = F.conv2d(xp, w4, None, stride, 0, dilation, c)
        else:
            y = taps_depthwise(xp, w, stride, dilation)
        ctx.save_for_backward(w)
        ctx.meta = (key, tuple(xp.shape), stride, dilation, _cl(xp))
        return y

    @staticmethod
    def backward(ctx, gy):
        (w,) = ctx.saved_tensors
        key, shape, stride, dilation, cl = ctx.meta
        c, kh, kw = w.shape
        gy = gy.contiguous(memory_format=torch.channels_last) if cl else gy.contiguous()

        def native(g, weights):
            return torch.ops.aten.convolution_backward(
                g, _empty(shape, g), weights.view(c, 1, kh, kw), None,
                stride, [0, 0], dilation, False, [0, 0], c, [True, False, False])[0]

        def ref(g, weights):
            return taps_depthwise_input_grad(g, weights, shape, stride, dilation, g)

        def check_bwd():
            rg, rw = _rand(gy.shape, 5, gy), _rand(w.shape, 6, w)
            return _same_bits(native(rg, rw), ref(rg, rw))

        gx = native(gy, w) if _verify(key + ("bwd",), check_bwd) else ref(gy, w)
        return gx, None, None, None


# ----- convolutions and linear layers -------------------------------------------------------------


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(u) for u in v)


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d under the spec, or None for what this module does not handle (string padding)."""
    if isinstance(padding, str) or x.dim() != 4:
        return None
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if groups == c and cg == 1 and o == c:
        xp = F.pad(x, [padding[1], padding[1], padding[0], padding[0]]) if any(padding) else x
        y = _Depthwise.apply(xp, w.reshape(c, kh, kw), stride, dilation)
    elif groups == 1 and (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0):
        xm = x.permute(0, 2, 3, 1).reshape(n * h * wd, c)
        return matmul(xm, w.reshape(o, c).t(), b).view(n, h, wd, o).permute(0, 3, 1, 2)
    else:
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (n, c*kh*kw, L)
        oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        k = cg * kh * kw
        cols = cols.view(n, groups, k, oh * ow).permute(1, 0, 3, 2).reshape(groups, n * oh * ow, k)
        wg = w.reshape(groups, o // groups, k)
        bg = [None] * groups if b is None else b.reshape(groups, o // groups)
        parts = [matmul(cols[g], wg[g].t(), bg[g]) for g in range(groups)]
        return (parts[0] if groups == 1 else torch.cat(parts, dim=1)).view(n, oh, ow, o).permute(0, 3, 1, 2)
    return y if b is None else b.view(1, -1, 1, 1) + y  # the bias, then the chain: as in matmul


def linear(x, w, b=None):
    lead = x.shape[:-1]
    return matmul(x.reshape(-1, x.shape[-1]), w.t(), b).view(*lead, w.shape[0])


def percentile_ranks(n: int, pct: float) -> tuple[int, int, float]:
    """numpy's default ('linear') percentile of n sorted values: the ranks of the two values it
    interpolates between and the weight of the upper one."""
    pos = (n - 1) * (float(pct) / 100.0)
    lo = int(math.floor(pos))
    return lo, min(lo + 1, n - 1), pos - lo


def percentile_lerp(a, b, t: float):
    """numpy's own lerp (numpy/lib/_function_base_impl.py, _lerp) between the lower and upper
    values (floats or tensors): single-rounding operations only, exact at either end."""
    d = b - a
    return b - d * (1.0 - t) if t >= 0.5 else a + d * t


def tree_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over one dimension as a pairwise tree of plain additions: the same bits everywhere."""
    t = t.movedim(dim, 0)
    while t.shape[0] > 1:
        half = t.shape[0] // 2
        s = t[:half] + t[half:2 * half]
        t = torch.cat([s, t[2 * half:]]) if t.shape[0] % 2 else s
    return t[0]


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 1, 1), the mean by a tree sum."""
    n, c, h, w = x.shape
    return (tree_sum(x.reshape(n, c, h * w), 2) / (h * w)).view(n, c, 1, 1)


# Reductions that run natively inside the mode and are named in its report.
_NATIVE_REDUCTIONS = {
    F.avg_pool2d: "avg_pool2d", F.adaptive_avg_pool2d: "adaptive_avg_pool2d", F.softmax: "softmax",
    F.log_softmax: "log_softmax", F.local_response_norm: "local_response_norm", F.layer_norm: "layer_norm",
    F.conv_transpose2d: "conv_transpose2d", F.conv1d: "conv1d", F.conv3d: "conv3d",
    torch.softmax: "softmax", torch.sum: "sum", torch.mean: "mean", torch.Tensor.sum: "sum",
    torch.Tensor.mean: "mean", torch.matmul: "matmul", torch.Tensor.__matmul__: "matmul", torch.mm: "mm",
    torch.bmm: "bmm", torch.addmm: "addmm", torch.einsum: "einsum", torch.Tensor.softmax: "softmax",
}


class _PortableMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.native: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d or func is torch.conv2d:
            with torch._C.DisableTorchFunction():
                y = conv2d(*args, **kwargs)
            if y is not None:
                return y
            self.native.add("conv2d (string padding)")
        elif func is F.linear:
            with torch._C.DisableTorchFunction():
                return linear(*args, **kwargs)
        elif func is F.adaptive_avg_pool2d:
            x = args[0]
            size = args[1] if len(args) > 1 else kwargs.get("output_size")
            if x.dim() == 4 and tuple(_pair(size) if size is not None else ()) == (1, 1):
                with torch._C.DisableTorchFunction():
                    return global_mean(x)
        if func in _NATIVE_REDUCTIONS and torch.is_grad_enabled():
            self.native.add(_NATIVE_REDUCTIONS[func])
        return func(*args, **kwargs)


MODES = ("default", "portable", "bf16")


class Numerics:
    """What a run's numerics were: the mode, and for 'portable' the reductions that ran natively
    (empty: every reduction followed the spec). 'bf16' runs the network in bfloat16 (autocast,
    deepvis_repro/bf16.py): the fastest where the hardware has it, never the same bits."""

    def __init__(self, mode: str = "default"):
        if mode not in MODES:
            raise DeepvisError(f"numerics must be one of {', '.join(MODES)}, got '{mode}'")
        self.mode = mode
        self.native: set[str] = set()
        self.fell_back = False  # bf16 asked, float32 ran (bf16.runs_bf16)

    @contextlib.contextmanager
    def active(self, device="cpu"):
        """Run the block under this mode (a no-op for 'default'); device: where the network runs."""
        if self.mode == "default":
            yield self
            return
        if self.mode == "bf16":
            kind = torch.device(device).type
            self.fell_back = self.runs_as(kind) != "bf16"
            with autocast_bf16(kind):
                yield self
            return
        m = _PortableMode()
        # On a GPU, TF32 convolutions and products (cuDNN's default) round to 10 bits: off here
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with m:
                yield self
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            self.native |= m.native

    def runs_as(self, device="cpu") -> str:
        """The mode that computes on this device: bf16 runs float32 ('default') where bfloat16 would
        only be emulated (bf16.runs_bf16); the other modes run as asked."""
        if self.mode == "bf16" and not runs_bf16(torch.device(device).type):
            return "default"
        return self.mode

    def report(self) -> dict:
        """What ran: a bf16 run that fell back to float32 (bf16.runs_bf16) says default, asked bf16."""
        if self.mode == "bf16" and self.fell_back:
            return {"mode": "default", "asked": "bf16", "native_reductions": None}
        return {"mode": self.mode, "native_reductions": sorted(self.native) if self.mode == "portable" else None}
