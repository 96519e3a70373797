"""Step rules: how a parametrization's leaf moves given its gradient.

- Paper: the original toolbox's rule on pixels: a learning rate from the preset's policy
  (constant, progress, progress01), an ascent step, then the four regularizers.
- Adaptive: Adam (Lucid) or NAdam (MACO) on the leaf, maximizing; the successors' parameters
  are on a scale of their own, so the backend's lr_scale does not apply.

A unit that has stopped (NaN, zero gradient) keeps its leaf: each row is updated only while active.
"""
from __future__ import annotations

import torch

from ..numerics import tree_sum
from .regularizers import regularize


def learning_rate(p, g: torch.Tensor, obj: torch.Tensor, lr_scale: float,
                  progress_scale: float = 1.0) -> torch.Tensor:
    """Per-image learning rate (N,) under the preset's policy."""
    if p.lr_policy == "constant":
        return torch.full_like(obj, p.lr * lr_scale)
    gd = g.double().flatten(1)
    gnorm2 = tree_sum(gd * gd, 1).clamp_min(1e-300)  # a fixed order: the same bits on every CPU
    if p.lr_policy == "progress":
        desired = torch.full_like(gnorm2, p.desired_prog * progress_scale)
    else:  # progress01, for units in 0..1 such as softmax outputs
        desired = torch.minimum(torch.full_like(gnorm2, p.early_prog * progress_scale),
                                p.late_prog_mult * progress_scale * (1 - obj.double()))
    return torch.minimum(desired / gnorm2, torch.full_like(gnorm2, p.max_lr * lr_scale)).to(obj.dtype)


class Paper:
    def __init__(self, preset, lr_scale: float, progress_scale: float):
        self.p, self.lr_scale, self.progress_scale = preset, lr_scale, progress_scale

    def update(self, param, g: torch.Tensor, obj: torch.Tensor, active: torch.Tensor, step: int) -> None:
        x = param.x.detach()
        lr = learning_rate(self.p, g, obj, self.lr_scale, self.progress_scale)
        g = torch.nan_to_num(g)
        new = regularize(x + lr.view(-1, 1, 1, 1) * g, g, step=step, **self.p.regularization())
        param.x = torch.where(active.view(-1, 1, 1, 1), new, x)


class Adaptive:
    def __init__(self, preset, leaf: torch.Tensor):
        kind = torch.optim.NAdam if preset.lr_policy == "nadam" else torch.optim.Adam
        self.opt = kind([leaf], lr=float(preset.lr), maximize=True)

    def update(self, param, g: torch.Tensor, obj: torch.Tensor, active: torch.Tensor, step: int) -> None:
        leaf = param.leaf
        old = leaf.detach().clone()
        leaf.grad = torch.nan_to_num(g)
        self.opt.step()
        with torch.no_grad():
            leaf.copy_(torch.where(active.view(-1, *[1] * (leaf.dim() - 1)), leaf, old))


def make_rule(preset, param, lr_scale: float, progress_scale: float):
    if preset.param == "pixels":
        return Paper(preset, lr_scale, progress_scale)
    return Adaptive(preset, param.leaf)
