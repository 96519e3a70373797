"""The objective before a layer's last clamp (``optimize.pre_activation=true``).

A unit whose value is the output of a ReLU6 (the embedded model's stem and head, and pool, the
average of head) cannot be visualized by ascending that value: at the paper's start image (the
mean plus a little noise) the clamp is off for most of them (1,179 of head's 1,280 channels and
1,046 of pool's 1,280 have an exactly zero gradient there), and the rest reach the clamp's top
(6) within a few steps, where the gradient is exactly zero again. Either way gradient ascent
stops with an image that is still the start noise. Lucid's answer is to optimize the value
before the activation ("mixed4a_pre_relu"): the same channel and position, unbounded, so the
ascent has a gradient from the first step to the last.

Here the clamp is found, not named: the layer's own module if it is a ReLU, ReLU6 or Hardtanh,
or the clamp whose output an average pool (or a flatten, a dropout, an identity) takes directly
as its input, checked on a probe forward pass (the input tensor *is* the clamp's output). While
the units of such a layer are optimized, that module passes its input through unchanged, so the
layer's value is its pre-activation (for pool: the average of head's pre-activation). A layer
with no clamp at its end is optimized as always. The option is never on by default: the paper
ascended the values themselves."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..backprop import forwards_replaced

#: Activations with a flat region where the gradient is exactly zero (ReLU6 is a Hardtanh).
CLAMPS = (nn.ReLU, nn.Hardtanh)
#: Modules that pass a clamp's output on without mixing channels nonlinearly: a layer made of one
#: of them over a clamp's output takes the clamp's pre-activation through them.
THROUGH = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.Flatten, nn.Identity,
           nn.Dropout)


def layer_clamp(backend, layer: str) -> str | None:
    """The module path of the clamp at the end of ``layer`` (its own module, or the one an average
    pool reads), or None where the layer ends in none (then the option changes nothing there)."""
    cache = backend.cache("clamps")
    if layer not in cache:
        mod = backend.layer_module(layer)
        cache[layer] = _probe(backend, layer, mod) if isinstance(mod, CLAMPS + THROUGH) else None
    return cache[layer]


def _probe(backend, layer: str, mod: nn.Module) -> str | None:
    """On a probe forward pass up to ``layer``: ``mod`` itself if it is a clamp, or the clamp whose
    output tensor is ``mod``'s input. A clamp module called more than once on the way (a ReLU
    reused inside a block) is not taken off: that would change its other uses too."""
    backend.layer_layout(layer)  # a backend's first pass traces its layouts: not this probe's
    outputs: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    seen: list[torch.Tensor] = []

    def record(path):
        def hook(_m, _i, out):
            outputs[path], calls[path] = out, calls.get(path, 0) + 1
        return hook

    handles = [m.register_forward_hook(record(path)) for path, m in backend.module.named_modules()
               if isinstance(m, CLAMPS)]
    handles.append(mod.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0] if inp else None)))
    try:
        h, w = backend.input_size
        with torch.no_grad():
            backend.forward(torch.zeros(1, backend.channels, h, w, device=backend.device), [layer])
    finally:
        for handle in handles:
            handle.remove()
    if isinstance(mod, CLAMPS):
        found = backend.module_path(mod)
    else:
        found = next((p for p, out in outputs.items() if seen and out is seen[-1]), None)
    return found if found is not None and calls.get(found) == 1 else None


@contextlib.contextmanager
def unclamped(backend, layers):
    """Within the block, the clamp at the end of each of ``layers`` passes its input through, so
    those layers' values are their pre-activations. The module is shared: no other forward pass
    of this backend may run meanwhile (the optimizer's command-line and atlas runs; the live
    view never asks for it)."""
    paths = sorted({p for p in (layer_clamp(backend, layer) for layer in layers) if p is not None})
    modules = dict(backend.module.named_modules())
    with forwards_replaced({modules[p]: _identity for p in paths}):
        yield paths


def _identity(x):
    return x

