"""Checks of the numbers and names a user types, each failing with one line that names the
option, the value and what would be valid (the CLIs turn it into exit status 2)."""
from __future__ import annotations

import math
import re

from .errors import DeepvisError


def whole(name: str, value, minimum: int | None = None, allow_none: bool = False):
    """An int (3, '3', 3.0), not 'abc' or 2.5; at least minimum."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise DeepvisError(f"{name} must be a whole number, got {value!r}")
    try:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            v = int(value)
        else:
            v = int(str(value).strip())
    except (TypeError, ValueError, OverflowError):
        raise DeepvisError(f"{name} must be a whole number, got {value!r}") from None
    if minimum is not None and v < minimum:
        raise DeepvisError(f"{name} must be at least {minimum}, got {v}")
    return v


def number(name: str, value, minimum: float | None = None, positive: bool = False,
           maximum: float | None = None, allow_none: bool = False):
    """A finite float; > 0 when positive; within [minimum, maximum]."""
    if value is None and allow_none:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DeepvisError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise DeepvisError(f"{name} must be a finite number, got {value!r}")
    if positive and v <= 0:
        raise DeepvisError(f"{name} must be greater than 0, got {v:g}")
    if minimum is not None and v < minimum:
        raise DeepvisError(f"{name} must be at least {minimum:g}, got {v:g}")
    if maximum is not None and v > maximum:
        raise DeepvisError(f"{name} must be at most {maximum:g}, got {v:g}")
    return v


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$")


def device_name(value) -> str:
    v = str(value).strip()
    if not _DEVICE.match(v):
        raise DeepvisError(f"unknown device '{value}'; valid: auto, cpu, cuda, cuda:N, mps")
    return v
