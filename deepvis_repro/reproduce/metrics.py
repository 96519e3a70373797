"""Measures of an optimized image: what the paper only showed, measured.

- total variation: mean absolute difference between neighbouring pixels (0..1 scale); a flat
  image has 0, the paper's regularizers should lower it;
- high-frequency energy: the share of the image's (mean-removed) power spectrum above a radial
  frequency of 0.25 cycles/pixel (half of Nyquist); white noise has about 80%, smooth images little;
- recognizability: the target class's rank (1 = top) when another, independent network classifies
  the image; and the SSIM against a stored reference (scikit-image).
"""
from __future__ import annotations

import numpy as np
import torch


def _gray01(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 3:
        a = a.mean(axis=2)
    return a / 255.0


def total_variation(image: np.ndarray) -> float:
    """Mean |difference| between vertical and horizontal neighbours, on a 0..1 scale, over channels."""
    a = np.asarray(image, dtype=np.float64) / 255.0
    if a.ndim == 2:
        a = a[:, :, None]
    dy = np.abs(np.diff(a, axis=0)).mean()
    dx = np.abs(np.diff(a, axis=1)).mean()
    return float((dx + dy) / 2)


def high_frequency_energy(image: np.ndarray, cutoff: float = 0.25) -> float:
    """Share (0..1) of spectral power at radial frequency > cutoff cycles/pixel; 0 for a flat image."""
    g = _gray01(image)
    g = g - g.mean()
    power = np.abs(np.fft.fft2(g)) ** 2
    fy = np.fft.fftfreq(g.shape[0])[:, None]
    fx = np.fft.fftfreq(g.shape[1])[None, :]
    total = power.sum()
    if total <= 1e-20:
        return 0.0
    return float(power[np.hypot(fy, fx) > cutoff].sum() / total)


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    if image.shape != reference.shape:
        return float("nan")
    return float(structural_similarity(image, reference, channel_axis=2, data_range=255))


def class_ranks(judge, images: np.ndarray, classes: list[int | None]) -> list[int | None]:
    """Rank (1 = top) of each image's target class under the judge network; None without a class."""
    if judge is None or not any(c is not None for c in classes):
        return [None] * len(classes)
    x = torch.cat([judge.preprocess(im) for im in images])
    # Ranked by the logits where the judge has them: the same order as its softmax, without the
    # exponential (whose vectorized rounding may differ between CPUs in a near tie)
    layer = judge.output_layer
    with torch.no_grad():
        p = judge.forward(x, [layer])[layer].flatten(1)
    out = []
    for row, c in zip(p, classes):
        out.append(None if c is None else int((row > row[c]).sum()) + 1)
    return out
