"""The paper's four regularizers (Yosinski et al. 2015, ../shared/PAPER.md): L2 decay, Gaussian
blur, clipping small-norm pixels and clipping small-contribution pixels, on a batch in the
backend contract's space, written so that each has the same bits on every CPU."""
from __future__ import annotations


import numpy as np
import torch

from ..errors import DeepvisError
from ..numerics import percentile_lerp, percentile_ranks, taps_depthwise


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of scipy.ndimage's 'reflect' mode (d c b a | a b c d | d c b a), any radius."""
    i = np.arange(-radius, n + radius)
    j = np.mod(i, 2 * n)
    j = np.where(j >= n, 2 * n - 1 - j, j)
    return torch.as_tensor(j, device=device)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's kernel: radius int(truncate * sigma + 0.5)."""
    radius = int(truncate * float(sigma) + 0.5)
    xs = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * xs ** 2)
    return phi / phi.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Blur each channel of (N,C,H,W) like scipy.ndimage.gaussian_filter(channel, sigma):
    separable, 'reflect' borders, truncated at 4 sigma; on x's device, batched.

    Each pass is the portable spec's own tap chain (deepvis_repro/numerics.py: a fused
    multiply-add per tap, in order, from zero), not F.conv2d: the same bits as oneDNN's kernel
    where that is verified to follow the spec, but ~20x faster at 8 images (3 vs 61 ms on the
    reference machine: a one-channel convolution is oneDNN's slow case), and the spec's bits in
    every numerics mode."""
    k = torch.as_tensor(gaussian_kernel1d(sigma, truncate), dtype=x.dtype, device=x.device)
    r = (k.numel() - 1) // 2
    if r == 0:
        return x
    n, c, h, w = x.shape
    flat = x.reshape(n * c, 1, h, w)
    flat = flat.index_select(2, _reflect_index(h, r, x.device))
    flat = taps_depthwise(flat, k.view(1, -1, 1), (1, 1), (1, 1))
    flat = flat.index_select(3, _reflect_index(w, r, x.device))
    flat = taps_depthwise(flat, k.view(1, 1, -1), (1, 1), (1, 1))
    return flat.reshape(n, c, h, w)


def percentile(score: torch.Tensor, pct: float) -> torch.Tensor:
    """Per row of (N, M), numpy's default percentile (linear interpolation, numpy's own lerp
    formula), in float64 from sorted values and single-rounding operations only, so that it has
    the same bits on every CPU (torch.quantile's fused lerp may not)."""
    v = torch.sort(score.double(), dim=1).values
    lo, hi, t = percentile_ranks(v.shape[1], pct)
    return percentile_lerp(v[:, lo], v[:, hi], t)


def _zero_below_percentile(x: torch.Tensor, score: torch.Tensor, pct: float) -> torch.Tensor:
    """Zero the pixels of each image whose score (N,H,W) is strictly below that image's pct-th
    percentile (numpy's default linear interpolation)."""
    thr = percentile(score.flatten(1), pct)
    small = score.double() < thr.view(-1, 1, 1)
    return x.masked_fill(small.unsqueeze(1), 0.0)


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """(N,C,H,W) -> (N,H,W): channels added in order, one rounding each (the same bits on every
    CPU, where a vectorized reduction's order may differ)."""
    out = t[:, 0]
    for c in range(1, t.shape[1]):
        out = out + t[:, c]
    return out


def check_regularization(*, decay=0.0, blur_radius=0.0, blur_every=0, small_norm_pct=0.0,
                         small_contrib_pct=0.0, **_):
    for name, v in (("small_norm_pct", small_norm_pct), ("small_contrib_pct", small_contrib_pct)):
        if not 0.0 <= float(v) <= 100.0:
            raise DeepvisError(f"{name} must be a percentile in [0, 100], got {v}")
    if not 0.0 <= float(decay) <= 1.0:
        raise DeepvisError(f"decay must be in [0, 1] (x *= 1 - decay), got {decay}")
    if float(blur_radius) < 0 or int(blur_every) < 0:
        raise DeepvisError(f"blur_radius and blur_every must be >= 0, got {blur_radius}, {blur_every}")


def regularize(x: torch.Tensor, grad: torch.Tensor, *, decay: float = 0.0, blur_radius: float = 0.0,
               blur_every: int = 0, small_norm_pct: float = 0.0, small_contrib_pct: float = 0.0,
               step: int = 0) -> torch.Tensor:
    """The paper's four regularizers on a batch (N,C,H,W), in the original's order: L2 decay,
    Gaussian blur (every blur_every steps), clipping small-norm pixels, clipping pixels of small
    contribution |sum_c grad * (-x)|. Returns the new x."""
    check_regularization(decay=decay, blur_radius=blur_radius, blur_every=blur_every,
                         small_norm_pct=small_norm_pct, small_contrib_pct=small_contrib_pct)
    if decay:
        x = x * (1.0 - decay)
    if blur_radius > 0 and blur_every > 0 and step % blur_every == 0:
        x = gaussian_blur(x, blur_radius)
    if small_norm_pct > 0:
        x = _zero_below_percentile(x, _channel_sum(x * x).sqrt(), small_norm_pct)
    if small_contrib_pct > 0:
        x = _zero_below_percentile(x, _channel_sum(grad * -x).abs(), small_contrib_pct)
    return x


