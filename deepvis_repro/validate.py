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


def flag(name: str, value) -> bool:
    """true or false (Hydra reads both as booleans); 'no', 'nope' or 1.5 are mistakes, not true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DeepvisError(f"{name} must be true or false, got {value!r}")


#: What a name that becomes part of a file name may hold (a setting's, a layer's slug's).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,79}$")


def safe_name(what: str, value) -> str:
    """A name that output files are named after: letters, digits, '.', '_', '+', '-', at most 80
    characters, not starting with '.' or '-' (so it can never name another folder: '../x')."""
    v = str(value)
    if not _SAFE_NAME.match(v) or ".." in v:
        shown = v if len(v) <= 60 else v[:57] + "..."
        raise DeepvisError(f"{what} {shown!r} cannot name output files: use 1-80 letters, digits, '.', '_', "
                           "'+' or '-', starting with a letter or digit, without '..'")
    return v


def slug(value: str) -> str:
    """A safe_name made from any text (a file's own name): other characters become '-'."""
    s = re.sub(r"[^A-Za-z0-9._+-]", "-", str(value))[:80].lstrip(".-").replace("..", "-") or "setting"
    return s


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$")


def device_name(value) -> str:
    v = str(value).strip()
    if not _DEVICE.match(v):
        raise DeepvisError(f"unknown device '{value}'; valid: auto, cpu, cuda, cuda:N, mps")
    return v
