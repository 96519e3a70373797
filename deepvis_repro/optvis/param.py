"""Image parametrizations: what the optimizer changes, and how that becomes an image x in the
backend contract's space (mean-subtracted RGB, 0..255 scale).

- Pixels: the paper's. x itself, put back into the valid range before each step.
- Fourier: Lucid's (Olah et al. 2017). A spectrum per decorrelated colour channel, scaled by
  1/f^decay_power so that low frequencies move first; image = sigmoid(recorrelate(irfft(spectrum))).
- Maco: MACO's (Fel et al. 2023). Only the phase is optimized; the magnitude is fixed to natural
  images' mean spectrum (natural.py), so the image keeps a photo's distribution of frequencies.

Every parametrization starts from one seeded draw (numpy's RandomState, the same on every machine)
repeated for each unit of a batch, so a batch of N gives the images of N single runs.
"""
from __future__ import annotations

import numpy as np
import torch

from .natural import magnitude_spectrum, recorrelate

#: Lucid's starting spectrum's standard deviation and its output scale (its "magic" 4: a smaller
#: field keeps the sigmoid out of saturation at the start)
FOURIER_SD = 0.01
FOURIER_DIVISOR = 4.0


class Pixels:
    """The paper's parametrization: the leaf is x itself."""

    def __init__(self, backend, x0: torch.Tensor):
        self.mean = backend.mean_image().to(x0.device)
        self.x = x0

    @property
    def leaf(self) -> torch.Tensor:
        return self.x

    def image(self) -> torch.Tensor:
        # keep x + mean a valid image; the gradient is taken with respect to this x
        self.x = (torch.clamp(self.x + self.mean, 0.0, 255.0) - self.mean).detach().requires_grad_(True)
        return self.x


class _Sigmoid:
    """Shared by the spectral parametrizations: a decorrelated field z -> x in the contract's space."""

    def __init__(self, backend, n: int, device):
        self.n, self.c = n, backend.channels
        self.h, self.w = backend.input_size
        self.mean = backend.mean_image().to(device)

    def to_x(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(recorrelate(z)) * 255.0 - self.mean

    def image(self) -> torch.Tensor:
        return self.to_x(self.field())


def spectrum_scale(h: int, w: int, decay_power: float = 1.0) -> np.ndarray:
    """(h, w//2+1): 1 / max(f, 1/max(h, w))^decay_power, f the frequency of each rfft2 bin in
    cycles per pixel (Lucid's scaling, for an orthonormal inverse FFT: a step moves low
    frequencies more than high ones, as natural images' 1/f spectrum has them)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    return 1.0 / np.maximum(f, 1.0 / max(h, w)) ** decay_power


class Fourier(_Sigmoid):
    """Lucid's: the leaf is a (N, C, H, W//2+1, 2) spectrum (real, imaginary)."""

    def __init__(self, backend, n: int, seed: int, device, decay_power: float = 1.0):
        super().__init__(backend, n, device)
        rs = np.random.RandomState(int(seed))
        one = rs.standard_normal((self.c, self.h, self.w // 2 + 1, 2)).astype(np.float32) * FOURIER_SD
        self.spectrum = torch.from_numpy(one)[None].repeat(n, 1, 1, 1, 1).to(device).requires_grad_(True)
        self.scale = torch.as_tensor(spectrum_scale(self.h, self.w, decay_power), dtype=torch.float32, device=device)

    @property
    def leaf(self) -> torch.Tensor:
        return self.spectrum

    def field(self) -> torch.Tensor:
        """(N, C, H, W): the image in decorrelated colour, before the sigmoid."""
        s = torch.complex(self.spectrum[..., 0], self.spectrum[..., 1]) * self.scale
        return torch.fft.irfft2(s, s=(self.h, self.w), norm="ortho") / FOURIER_DIVISOR


class Maco(_Sigmoid):
    """MACO's: the leaf is a (N, C, H, W//2+1) phase; the magnitude is a fixed buffer."""

    def __init__(self, backend, n: int, seed: int, device):
        super().__init__(backend, n, device)
        rs = np.random.RandomState(int(seed))
        one = rs.uniform(-np.pi, np.pi, (self.c, self.h, self.w // 2 + 1)).astype(np.float32)
        self.phase = torch.from_numpy(one)[None].repeat(n, 1, 1, 1).to(device).requires_grad_(True)
        self.magnitude = torch.as_tensor(magnitude_spectrum(self.h, self.w, self.c), device=device)
        self._negative = torch.as_tensor([(-k) % self.h for k in range(self.h)], device=device)  # row of -ky

    @property
    def leaf(self) -> torch.Tensor:
        return self.phase

    def hermitian_phase(self) -> torch.Tensor:
        """The phase with the symmetry a real image's spectrum has: in the columns that rfft2 holds
        both halves of (frequency 0, and w/2 for an even width), the phase at -ky is minus the
        phase at ky. Without it irfft2 keeps only the symmetric part of those columns and their
        magnitude would drift from the fixed one."""
        ph = self.phase
        cols = [0] + ([self.w // 2] if self.w % 2 == 0 else [])
        fixed = [(ph[..., c] - ph[..., c].index_select(-1, self._negative)) / 2 for c in cols]
        parts = [fixed[0][..., None], ph[..., 1:self.w // 2 + 1 - (len(cols) - 1)]]
        if len(cols) == 2:
            parts.append(fixed[1][..., None])
        return torch.cat(parts, dim=-1)

    def unscaled_field(self) -> torch.Tensor:
        """irfft of magnitude * e^(i phase): the field whose spectrum's magnitude is the fixed one."""
        return torch.fft.irfft2(torch.polar(self.magnitude.expand_as(self.phase), self.hermitian_phase()),
                                s=(self.h, self.w), norm="ortho")

    def field(self) -> torch.Tensor:
        # standardized per image, as MACO does: the magnitude fixes the shape of the spectrum, the
        # standardization its level (the DC bin and one overall factor are all that change)
        z = self.unscaled_field()
        z = z - z.mean(dim=(1, 2, 3), keepdim=True)
        return z / (z.std(dim=(1, 2, 3), keepdim=True) + 1e-4)


def make_param(backend, preset, x0: torch.Tensor, seed: int):
    if preset.param == "fourier":
        return Fourier(backend, len(x0), seed, x0.device, preset.decay_power)
    if preset.param == "maco":
        return Maco(backend, len(x0), seed, x0.device)
    return Pixels(backend, x0)
