"""What the user chose in the live view (shared by the app, which changes settings, the network
thread, which reads them, and the drawing, which shows them); the keys that choose it: keys.py."""
from __future__ import annotations

from dataclasses import dataclass


BOOST_INDIV = (0.0, 0.3, 0.5, 0.8, 1.0)
BOOST_GAMMA = (1.0, 0.7, 0.5, 0.3)

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
    attention: bool = False      # the grid shows the layer's attention from the unit's strongest token
