"""What the successors know of natural images: the colour correlation (Lucid's decorrelated colour
space) and the mean magnitude spectrum (MACO's fixed magnitude). Both are measured here, from
scikit-image's sample photos that every install has; nothing is downloaded. Lucid and MACO ship the
same two statistics measured on ImageNet; on four photos they come out close (Lucid's matrix
differs by a few hundredths per entry), which is all a preconditioner needs."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..images import LUMA

#: scikit-image's colour photographs of natural scenes (its other samples are micrographs,
#: a galaxy field and drawings, whose statistics are not a photo's)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    import skimage.data

    return tuple(getattr(skimage.data, name)()[..., :3].astype(np.float64) / 255.0 for name in PHOTOS)


@lru_cache(maxsize=2)
def color_correlation(channels: int = 3) -> np.ndarray:
    """(3, 3) float64: the square root of the photos' RGB covariance (0..1 scale), by SVD, scaled so
    its largest column has norm 1 (Lucid's normalization). recorrelate(z) = z @ C.T maps a
    decorrelated colour to RGB; its columns are the colour space's principal axes. A grey
    model's one channel has nothing to decorrelate: (1, 1) identity, by the same normalization."""
    if channels == 1:
        return np.ones((1, 1))
    pixels = np.concatenate([p.reshape(-1, 3) for p in _photos()])
    cov = np.cov(pixels, rowvar=False)
    u, s, _ = np.linalg.svd(cov)
    u *= np.sign(u[0])  # SVD's signs are arbitrary: fix them so every machine has the same matrix
    c = u * np.sqrt(s)
    return c / np.linalg.norm(c, axis=0).max()


def recorrelate(z: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) decorrelated colour -> RGB directions (before the sigmoid)."""
    c = torch.as_tensor(color_correlation(z.shape[1]), dtype=z.dtype, device=z.device)
    return torch.einsum("ij,njhw->nihw", c, z)


def decorrelate(rgb: torch.Tensor) -> torch.Tensor:
    """recorrelate's inverse."""
    c = torch.as_tensor(np.linalg.inv(color_correlation(rgb.shape[1])), dtype=rgb.dtype, device=rgb.device)
    return torch.einsum("ij,njhw->nihw", c, rgb)


def _fit(photo: np.ndarray, h: int, w: int) -> torch.Tensor:
    """Centre crop to h:w, resized to (h, w): (3, h, w) float64."""
    ph, pw = photo.shape[:2]
    if ph * w > pw * h:
        ch, cw = round(pw * h / w), pw
    else:
        ch, cw = ph, round(ph * w / h)
    top, left = (ph - ch) // 2, (pw - cw) // 2
    t = torch.from_numpy(np.ascontiguousarray(photo[top:top + ch, left:left + cw])).permute(2, 0, 1)[None]
    return F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


@lru_cache(maxsize=8)
def magnitude_spectrum(h: int, w: int, channels: int = 3) -> np.ndarray:
    """(channels, h, w//2+1) float32: the mean magnitude of the photos' spectra at h x w, per
    channel of the decorrelated colour space (where MACO builds its image; for a grey model, of
    the photos' luma), each photo also mirrored. The overall scale does not matter: MACO
    standardizes the image it makes."""
    mags = []
    for photo in _photos():
        if channels == 1:
            photo = (photo @ np.asarray(LUMA))[..., None]
        for view in (photo, photo[:, ::-1]):
            rgb = _fit(view, h, w)
            z = decorrelate((rgb - rgb.mean(dim=(1, 2), keepdim=True))[None])[0]
            mags.append(torch.fft.rfft2(z, norm="ortho").abs())
    return torch.stack(mags).mean(0).float().numpy()
