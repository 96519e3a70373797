"""What the user chose in the live view, and the keys that choose it (shared by the app, which
changes settings, the network thread, which reads them, and the drawing, which shows them)."""
from __future__ import annotations

from dataclasses import dataclass

BOOST_INDIV = (0.0, 0.3, 0.5, 0.8, 1.0)
BOOST_GAMMA = (1.0, 0.7, 0.5, 0.3)

HELP = [
    ("arrows / i j k l", "move the selected unit (capitals: by 3)"),
    ("u / o", "previous / next layer"),
    ("b", "back mode: off, gradient, deconv, guided"),
    ("n", "back image raw / as a norm"),
    ("a", "grid: activations / back diffs"),
    ("d", "freeze the backprop unit while the cursor roams"),
    ("s", "pattern mode: every unit's optimized image (atlas)"),
    ("z", "zoom: the selected unit fills the grid pane"),
    ("t / T", "boost: per-channel / gamma"),
    ("f", "freeze the frame"),
    ("c", "camera / files"),
    ("e / w", "next / previous file"),
    ("0", "crop / stretch the input"),
    ("h", "this help"),
    ("q", "quit"),
]


@dataclass(frozen=True)
class ViewSettings:
    """Replaced (never mutated) by the drawing thread, read by the network."""
    layer: int = 0
    unit: int = 0
    back: int = 0
    back_norm: bool = False
    back_diffs: bool = False
    frozen: tuple | None = None  # (layer name, channel) of a frozen backprop unit
    zoom: bool = False
    boost: int = 0
    gamma: int = 0
    crop: bool = True
    pattern: bool = False        # the grid shows the atlas's optimized images
