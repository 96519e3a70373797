"""numerics=bf16: the network in bfloat16 (autocast), for speed where the hardware has it.

Why a module of its own: autocast alone is not enough on a CPU. Measured on the reference machine
(AMD EPYC, AVX-512 BF16, torch 2.14.1, the embedded model, 8 images): oneDNN's bfloat16 1x1
convolutions run 2.4x float32, but PyTorch's input gradient of a *depthwise* convolution in
bfloat16 falls off the fast path (4x slower than in float32: 112 ms of a 160 ms step; strided
ones 4-17x), which ate the gain. The input gradient of a depthwise convolution is itself a
depthwise convolution (the output gradient, zero-stuffed for a stride, correlated with the
flipped kernel), and the forward kernel is fast in bfloat16: ``_Depthwise`` computes it so.

Only the network runs in bfloat16: the image, its gradient, the step rule and the regularizers stay
float32 (autocast casts the image where the first convolution reads it).
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_warned = False


def native_bf16(device_type: str) -> bool:
    """Does this device compute bfloat16 natively (CPU: AVX512-BF16 or AMX; CUDA: Ampere on)?"""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(u) for u in v)


def depthwise_input_grad(gy: torch.Tensor, w: torch.Tensor, in_shape, stride, padding) -> torch.Tensor:
    """d conv2d(x, w, stride, padding, groups=C) / dx applied to gy, as a forward depthwise
    convolution: gy zero-stuffed by the stride, correlated with the flipped kernel over its full
    extent, then cut to the padded input and unpadded. Dilation 1."""
    n, c, h, wd = in_shape
    kh, kw = w.shape[-2:]
    sh, sw = stride
    cl = gy.dim() == 4 and gy.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    if (sh, sw) != (1, 1):
        oh, ow = gy.shape[-2:]
        z = torch.empty((n, c, (oh - 1) * sh + 1, (ow - 1) * sw + 1), dtype=gy.dtype, device=gy.device,
                        memory_format=fmt).zero_()
        z[:, :, ::sh, ::sw] = gy
        gy = z
    g = F.conv2d(gy, w.flip(-2, -1), None, 1, (kh - 1, kw - 1), 1, c)
    ph, pw = padding
    full_h, full_w = h + 2 * ph, wd + 2 * pw  # rows a stride skipped at the end get no gradient
    if g.shape[-2] < full_h or g.shape[-1] < full_w:
        g = F.pad(g, [0, full_w - g.shape[-1], 0, full_h - g.shape[-2]])
    return g[:, :, ph:ph + h, pw:pw + wd]


class _Depthwise(torch.autograd.Function):
    """A depthwise convolution whose input gradient is ``depthwise_input_grad`` (frozen weights)."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding):
        ctx.save_for_backward(w)
        ctx.meta = (tuple(x.shape), stride, padding)
        return F.conv2d(x, w, b, stride, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx, gy):
        (w,) = ctx.saved_tensors
        shape, stride, padding = ctx.meta
        return depthwise_input_grad(gy, w, shape, stride, padding), None, None, None, None


def _conv_args(args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, args), **kwargs)
    return (a["input"], a["weight"], a.get("bias"), a.get("stride", 1), a.get("padding", 0),
            a.get("dilation", 1), a.get("groups", 1))


class _Bf16Mode(TorchFunctionMode):
    """Under autocast: each frozen weight cast to bfloat16 once per block, not on every call
    (autocast keeps casts only of weights that require grad), and on a CPU bfloat16 depthwise
    convolutions that need an input gradient routed through _Depthwise."""

    def __init__(self, device_type: str):
        super().__init__()
        self.cpu = device_type == "cpu"
        self._cast: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def _bf16(self, t):
        if t is None or t.requires_grad or t.dtype != torch.float32:
            return t
        hit = self._cast.get(id(t))
        if hit is None or hit[0] is not t or hit[1] != t._version:  # the same, unchanged tensor
            hit = (t, t._version, t.to(torch.bfloat16))
            self._cast[id(t)] = hit
        return hit[2]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d or func is torch.conv2d:
            x, w, b, stride, padding, dilation, groups = _conv_args(args, kwargs)
            with torch._C.DisableTorchFunction():
                w, b = self._bf16(w), self._bf16(b)
                if (self.cpu and torch.is_grad_enabled() and x.dim() == 4 and x.requires_grad
                        and groups == x.shape[1] and w.shape[:2] == (groups, 1) and not w.requires_grad
                        and not (b is not None and b.requires_grad)
                        and not isinstance(padding, str) and _pair(dilation) == (1, 1)):
                    # x.to: what autocast would do; differentiable
                    return _Depthwise.apply(x.to(torch.bfloat16), w, b, _pair(stride), _pair(padding))
                return F.conv2d(x, w, b, stride, padding, dilation, groups)
        if func is F.linear:
            names = ("input", "weight", "bias")
            a = dict(zip(names, args), **kwargs)
            with torch._C.DisableTorchFunction():
                return F.linear(a["input"], self._bf16(a["weight"]), self._bf16(a.get("bias")))
        return func(*args, **kwargs)


#: measured (issue 34): the embedded model's optimizer step in emulated bfloat16 on an AVX2-only CPU
#: took 18x its float32 time; no run waits that long unless asked to
EMULATED_SLOWDOWN = 18
EMULATE_ENV = "DEEPVIS_BF16_EMULATE"


def emulation_asked() -> bool:
    """DEEPVIS_BF16_EMULATE=1: compute in bfloat16 even where it is emulated (to see its effect)."""
    return os.environ.get(EMULATE_ENV) == "1"


def runs_bf16(device_type: str) -> bool:
    """Whether numerics=bf16 computes in bfloat16 here: natively, or emulated when asked."""
    return native_bf16(device_type) or emulation_asked()


def fallback_note(device_type: str) -> str:
    return (f"numerics=bf16: this {device_type.upper()} has no native bfloat16 (CPU: AVX512-BF16 or AMX); "
            f"emulated it runs about {EMULATED_SLOWDOWN}x slower than float32, so this run computes in "
            f"float32 ({EMULATE_ENV}=1 emulates bfloat16 anyway)")


def _say_once(text: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"deepvis: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def autocast_bf16(device_type: str):
    """The block's network arithmetic in bfloat16 (see the module's doc); float32 where the device
    has no bfloat16 of its own (``runs_bf16``), said once."""
    if not runs_bf16(device_type):
        _say_once(fallback_note(device_type))
        yield
        return
    if not native_bf16(device_type):
        _say_once(f"numerics=bf16: emulated bfloat16 on this {device_type.upper()} ({EMULATE_ENV}=1): "
                  f"about {EMULATED_SLOWDOWN}x slower than float32")
    with torch.autocast(device_type, dtype=torch.bfloat16), _Bf16Mode(device_type):
        yield
