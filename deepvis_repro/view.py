"""The view: how any picture becomes what a network sees (its input size, Caffe-style resize,
centre crop or stretch, and grey for a 1-channel model), as one small value that backends, loader
processes (plain data, cheap to pickle) and atlas manifests share."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .images import grey_rgb, resize_for_input, to_rgb_uint8


@dataclass(frozen=True)
class View:
    input_size: tuple[int, int]
    crop: bool = True
    #: (h, w): stretch to this size first, then centre-crop the input size (Caffe's transform).
    resize: tuple[int, int] | None = None
    #: A 1-channel model's view: the picture's ITU-R 601 luma in all three channels.
    grey: bool = False
    #: timm's eval transform (its pretrained_cfg): the shorter side to floor(size / crop_pct) with
    #: this interpolation, then the centre crop; 1.0 / bilinear: the package's own crop.
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def fit(self, image: np.ndarray, crop: bool | None = None) -> np.ndarray:
        """Any picture -> HxWx3 uint8 at the input size (crop: this call's choice, e.g. the live
        view's c key; None: the view's own)."""
        view = resize_for_input(to_rgb_uint8(image), self.input_size,
                                crop=self.crop if crop is None else bool(crop), resize=self.resize,
                                crop_pct=self.crop_pct, interpolation=self.interpolation)
        return grey_rgb(view) if self.grey else view

    def as_dict(self) -> dict:
        """Plain data for loader processes and manifests. 'grey', 'crop_pct' and 'interpolation'
        are written only when set, so an atlas keeps the identity it had before they existed."""
        out = {"input_size": list(self.input_size), "crop": bool(self.crop),
               "resize": list(self.resize) if self.resize else None}
        if self.grey:
            out["grey"] = True
        if self.crop_pct != 1.0 or self.interpolation != "bilinear":
            out.update(crop_pct=float(self.crop_pct), interpolation=str(self.interpolation))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "View":
        return cls(tuple(int(v) for v in d["input_size"]), bool(d["crop"]),
                   tuple(int(v) for v in d["resize"]) if d.get("resize") else None, bool(d.get("grey", False)),
                   float(d.get("crop_pct", 1.0)), str(d.get("interpolation", "bilinear")))
