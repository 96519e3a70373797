"""Back modes, below both the live view and the atlas's montages: plain gradient, deconvnet
(Zeiler & Fergus: a ReLU's backward passes only positive gradients, ignoring the forward mask) and guided backprop (both: positive
gradients where the forward input was active). Seeded, as in the original toolbox, with the
selected channel's own activation map (all other channels zero)."""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from torch import nn

from .images import stretch_around_grey

MODES = ("off", "gradient", "deconv", "guided")
RELU_TYPES = (nn.ReLU, nn.ReLU6)
#: Smooth activations of today's networks, by class name (torch's, timm's and torchvision's own).
#: The rule for them, which for a ReLU is exactly Zeiler & Fergus's and Springenberg's: deconv
#: passes the positive part of the incoming gradient, ignoring the forward pass; guided backprop
#: takes the activation's own backward, then its positive part. Norms (LayerNorm, BatchNorm),
#: attention and activations called as functions inside a module pass their plain gradient.
SMOOTH_TYPES = ("GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish", "Hardswish", "HardSwish", "Mish", "ELU",
                "SELU", "CELU", "LeakyReLU", "Softplus", "Hardsigmoid", "HardSigmoid", "Sigmoid", "Tanh")


class _ModedReLU(torch.autograd.Function):
    """A ReLU (hi=None) or ReLU6 (hi=6) whose backward pass is a back mode's.

    Why not a backward hook on the module: a full backward hook wraps every call in two extra
    autograd nodes, and its result is a second full-size tensor on top of the native backward's;
    on the embedded model at 4 images that was ~15% of a montage's backward pass (measured). Here
    guided backprop is the native masked gradient clamped in place, and deconv one clamp.
    The output is saved, not the input, as torch's own ReLU does (0 < y < hi exactly where
    0 < x < hi)."""

    @staticmethod
    def forward(ctx, x, hi, mode):
        y = torch.relu(x) if hi is None else x.clamp(0.0, hi)
        ctx.hi, ctx.mode = hi, mode
        if mode == "guided":
            ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        if ctx.mode == "deconv":  # the forward mask ignored: only positive gradients pass
            return g.clamp(min=0), None, None
        (y,) = ctx.saved_tensors
        if ctx.hi is None:
            masked = torch.ops.aten.threshold_backward(g, y, 0.0)
        else:
            masked = torch.ops.aten.hardtanh_backward(g, y, 0.0, ctx.hi)
        return masked.clamp_(min=0), None, None  # a fresh tensor of ours: clamped in place


def _moded_relu(x, hi, mode):
    return _ModedReLU.apply(x, hi, mode)


class _PositiveGradient(torch.autograd.Function):
    """Forward: ``y`` as given; backward: the positive part of the incoming gradient, to ``x``."""

    @staticmethod
    def forward(ctx, x, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0), None


class _ClampGradient(torch.autograd.Function):
    """The identity, whose backward keeps the positive part of the gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


def _moded_smooth(x, forward, mode):
    if mode == "deconv":  # the forward pass ignored: only positive gradients pass
        return _PositiveGradient.apply(x, forward(x).detach())
    return _ClampGradient.apply(forward(x))  # guided: the activation's own derivative, then its positive part


def smooth_activations(module: nn.Module) -> list[str]:
    """Class names of the smooth activation modules in ``module`` (what the back modes' rule for
    them applies to; the live view and the README say it)."""
    return sorted({type(m).__name__ for m in module.modules() if type(m).__name__ in SMOOTH_TYPES})


@contextlib.contextmanager
def relu_backward(module: nn.Module, mode: str):
    """Within the block, every ReLU/ReLU6 module of ``module`` backpropagates by ``mode`` (its
    forward is the same function; its module hooks still run)."""
    if mode == "gradient":
        yield
        return
    if mode not in ("deconv", "guided"):
        raise ValueError(f"unknown back mode {mode!r}")
    forwards = {}
    for m in module.modules():
        if isinstance(m, RELU_TYPES):
            hi = 6.0 if isinstance(m, nn.ReLU6) else None
            forwards[m] = functools.partial(_moded_relu, hi=hi, mode=mode)
        elif type(m).__name__ in SMOOTH_TYPES:
            forwards[m] = functools.partial(_moded_smooth, forward=type(m).forward.__get__(m), mode=mode)
    with forwards_replaced(forwards):
        yield


@contextlib.contextmanager
def forwards_replaced(forwards: dict):
    """Within the block, each module in ``forwards`` runs the function given for it instead of its
    forward (its hooks still run): the back modes here, the optimizer's pre_activation option."""
    for m, f in forwards.items():
        m.forward = f  # an instance attribute shadows the class's forward; deleting it restores the class's
    try:
        yield
    finally:
        for m in forwards:
            m.__dict__.pop("forward", None)


def backprop(backend, x: torch.Tensor, layer: str, channel: int, mode: str = "gradient",
             also: str | None = None):
    """Backpropagate the seed (channel's activation map, others zero) from ``layer`` to the input.
    Returns (input gradient (C,H,W), gradient at layer ``also`` or None, the forward activations)."""
    x = x.detach().clone().requires_grad_(True)
    layers = [layer] + ([also] if also and also != layer else [])
    with relu_backward(backend.module, mode):
        acts = backend.forward(x, layers)
        a = acts[layer]
        seed = torch.zeros_like(a)
        seed[:, channel] = a[:, channel].detach()
        wrt = [x] + ([acts[also]] if also and also != layer and acts[also].requires_grad else [])
        grads = torch.autograd.grad(a, wrt, grad_outputs=seed, allow_unused=True)
    g_also = None
    if also == layer:
        g_also = seed[0].detach()
    elif len(grads) > 1:
        g_also = None if grads[1] is None else grads[1][0].detach()
    gx = grads[0]
    gx = torch.zeros_like(x[0]) if gx is None else gx[0].detach()
    return gx, g_also, {k: v.detach() for k, v in acts.items()}


def gradient_image(g: torch.Tensor, as_norm: bool = False) -> np.ndarray:
    """(C,H,W) gradient -> HxWx3 uint8: raw (grey at zero, symmetric scale) or its per-pixel norm
    (a grey model's one channel shown grey)."""
    g = g.detach().float().cpu()
    if g.shape[0] == 1:
        g = g.expand(3, -1, -1)
    if as_norm:
        n = g.norm(dim=0)
        n = n / n.max().clamp_min(1e-12)
        img = (n.sqrt() * 255).round().to(torch.uint8)  # sqrt: faint structure stays visible
        return img.unsqueeze(-1).expand(-1, -1, 3).numpy().copy()
    return stretch_around_grey(g.permute(1, 2, 0).numpy())
