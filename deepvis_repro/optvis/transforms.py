"""Transformation robustness: each step, the network sees randomly moved copies of the image and
the objective is their mean, so that the image works at any small shift, scale and rotation
(Lucid) or in any crop (MACO), not through one exact arrangement of pixels.

Each copy is one affine resampling (grid_sample) back to the model's input size, so units keep
their positions and the network's input size never changes; what falls outside the image is the
backend's mean colour (0 in the contract's space), as Lucid pads with grey. The draws come from
numpy's RandomState, the same on every machine, one per step for the whole batch (as N single runs
would each get).

- lucid: Lucid's standard transforms (pad 12, jitter 8, scale 0.9..1.1, rotate -10..10 degrees,
  jitter 4): a shift of up to 4 + 2 pixels, a scale and a rotation about the centre; scaling down
  shows the grey surround that Lucid's padding adds.
- crops: MACO's random crops: a window of crop_min..crop_max of each side (the image's aspect), anywhere in
  the image, resized to the input; with noise, Gaussian noise on each copy.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LUCID_SCALES = [1 + (i - 5) / 50.0 for i in range(11)]
LUCID_ANGLES = list(range(-10, 11)) + [0] * 5  # Lucid's list: no rotation is drawn more often


class Robustness:
    def __init__(self, preset, size: tuple[int, int], seed: int):
        self.kind, self.k, self.noise = preset.transforms, int(preset.crops), float(preset.noise)
        self.crop = (float(preset.crop_min), float(preset.crop_max))
        self.h, self.w = size
        self.rs = np.random.RandomState([int(seed), 1])  # a stream of its own beside the start's

    @property
    def random(self) -> bool:
        """Whether the network sees a random copy (then the objective is a noisy estimate)."""
        return self.kind != "none" or self.noise > 0

    @property
    def copies(self) -> int:
        return 1 if self.kind == "none" else self.k

    def _affine(self) -> np.ndarray:
        """One draw: (2, 3) mapping output to source in grid_sample's normalized coordinates."""
        if self.kind == "lucid":
            s = float(self.rs.choice(LUCID_SCALES))
            a = math.radians(float(self.rs.choice(LUCID_ANGLES)))
            t = np.array([self.rs.randint(0, 8) - 3.5 + self.rs.randint(0, 4) - 1.5 for _ in range(2)])
            # in pixels about the centre: p = R(-a) q / s + t; normalized: D^-1 R D / s with D = diag(w/2, h/2)
            d = np.diag([self.w / 2.0, self.h / 2.0])
            r = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
            m = np.linalg.inv(d) @ r @ d / s
            return np.concatenate([m, (t / np.array([self.w / 2.0, self.h / 2.0]))[:, None]], axis=1)
        f = self.rs.uniform(*self.crop)  # crops: the same fraction of each side (no distortion)
        c = self.rs.uniform(-(1 - f), 1 - f, size=2)
        return np.array([[f, 0.0, c[0]], [0.0, f, c[1]]])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N,C,H,W) -> (copies * N, C, H, W), copy-major (rows j*N .. j*N+N-1 are copy j)."""
        c = x.shape[1]
        if self.kind == "none":
            out = x
        else:
            n = len(x)
            theta = torch.as_tensor(np.stack([self._affine() for _ in range(self.k)]), dtype=x.dtype, device=x.device)
            grid = F.affine_grid(theta, [self.k, c, self.h, self.w], align_corners=False)
            out = F.grid_sample(x.repeat(self.k, 1, 1, 1), grid.repeat_interleave(n, 0), mode="bilinear",
                                padding_mode="zeros", align_corners=False)
        if self.noise > 0:
            noise = self.rs.standard_normal((self.copies, 1, c, self.h, self.w)).astype(np.float32) * (self.noise * 255.0)
            out = (out.view(self.copies, -1, c, self.h, self.w) + torch.from_numpy(noise).to(out)).view_as(out)
        return out
