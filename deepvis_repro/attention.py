"""Attention maps of a transformer layer: the softmax weights each query token gives every key
token, captured from the model's own call, for the live view's attention key (x).

Two ways a model computes attention, two captures:
- ``F.scaled_dot_product_attention`` (timm's fused attention, EVA's after its rotary embedding,
  hand-written blocks): inside the layer's module a TorchFunctionMode sees the call's q and k (and
  mask and scale) and computes softmax(q k^T * scale + mask) beside it; the model's own result is
  untouched.
- ``nn.MultiheadAttention`` (torchvision's ViT), which computes its weights only when asked: a
  pre-hook asks (need_weights, per head) and a hook takes them from its output; the caller's
  output is what it was (the weights were discarded by the caller anyway).

Only global attention maps onto the patch grid: a layer whose keys are not the layer's prefix
tokens plus its grid (Swin's windows, pooled keys) is refused in one line, never drawn.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import DeepvisError

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def attention_module(backend, layer: str) -> nn.Module | None:
    """The module whose attention the layer shows: the layer's own module when it attends, or the
    one attending module inside it (a transformer block); None when there is none or several."""
    subs = getattr(backend, "_submodules", None)
    path = getattr(backend, "_paths", {}).get(backend.resolve_layer(layer))
    if subs is None or path is None or path not in subs:
        return None
    root = subs[path]
    found = [m for m in root.modules() if _attends(m)]
    if len(found) == 1:
        return found[0]
    return root if _attends(root) and not found else None


def _attends(m: nn.Module) -> bool:
    if isinstance(m, nn.MultiheadAttention):
        return True
    # timm's Attention and its kin: q/k/v projections and a head count; the call is SDPA or its
    # unfused equivalent, both captured below (the unfused one through fused_attn switched on)
    return hasattr(m, "num_heads") and (hasattr(m, "qkv") or hasattr(m, "q_proj") or hasattr(m, "q"))


class _Capture(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.inside = 0
        self.maps: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside and func in _SDPA:
            q, k = args[0], args[1]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
            scale = kwargs.get("scale")
            with torch._C.DisableTorchFunction():
                s = (q.float() @ k.float().transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
                if mask is not None:
                    s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
                if causal:
                    n, m = s.shape[-2:]
                    s = s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
                self.maps.append(s.softmax(-1).detach())
        return func(*args, **kwargs)


@contextlib.contextmanager
def capture_attention(module: nn.Module):
    """Within the block, the attention weights of ``module``'s calls are collected: yields a list
    that holds one (B, heads, queries, keys) tensor per call once the forward pass ran."""
    found: list[torch.Tensor] = []
    handles = []
    if isinstance(module, nn.MultiheadAttention):
        def ask(_m, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def take(_m, _args, _kwargs, out):
            if isinstance(out, tuple) and out[1] is not None:
                w = out[1]
                found.append((w if w.dim() == 4 else w[:, None]).detach().float())
        handles = [module.register_forward_pre_hook(ask, with_kwargs=True),
                   module.register_forward_hook(take, with_kwargs=True)]
        try:
            yield found
        finally:
            for h in handles:
                h.remove()
        return
    mode = _Capture()
    fused = getattr(module, "fused_attn", None)
    if fused is False:
        module.fused_attn = True  # timm's unfused path is the same softmax; SDPA is where we see it

    def enter(*_):
        mode.inside += 1

    def leave(*_):
        mode.inside -= 1
    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with mode:
            yield mode.maps
    finally:
        for h in handles:
            h.remove()
        if fused is False:
            module.fused_attn = False


def query_maps(weights: torch.Tensor, layout, query: int) -> np.ndarray:
    """(heads, rows, cols): the weights query ``query`` gives the patch grid's tokens (prefix
    tokens' keys left out), for one image. weights: (heads, queries, keys)."""
    if layout.kind != "tokens" or layout.grid is None:
        raise DeepvisError(f"attention maps need a token layer on a patch grid; this one is {layout.describe()}")
    p, (gh, gw) = len(layout.prefix), layout.grid
    heads, nq, nk = weights.shape
    if nk != p + gh * gw or nq != nk:
        raise DeepvisError(f"this layer's attention has {nk} keys, not its {p} prefix tokens and {gh}x{gw} "
                           "patches (windowed or pooled attention): not drawn on the grid")
    return weights[:, query, p:].reshape(heads, gh, gw).cpu().numpy()
