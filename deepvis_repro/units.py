"""Units, written ``layer:channel`` or ``layer:channel:y:x`` everywhere (CLI, configs, files)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DeepvisError


@dataclass(frozen=True)
class Unit:
    layer: str
    channel: int
    y: int | None = None
    x: int | None = None

    def __str__(self) -> str:
        pos = f":{self.y}:{self.x}" if self.y is not None else ""
        return f"{self.layer}:{self.channel}{pos}"

    @property
    def slug(self) -> str:
        """A file-name-safe form: fc_130, blocks.5_10_7_7."""
        return str(self).replace(":", "_").replace("/", "-")


def parse_unit(spec) -> Unit:
    if isinstance(spec, Unit):
        return spec
    parts = str(spec).strip().split(":")
    try:
        if len(parts) == 2:
            return Unit(parts[0], int(parts[1]))
        if len(parts) == 4:
            return Unit(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))
    except ValueError:
        pass
    raise DeepvisError(f"bad unit '{spec}': write layer:channel or layer:channel:y:x "
                       "with whole numbers, e.g. fc:130 or blocks.5:10:7:7")


def layer_shapes(backend, layers) -> dict[str, tuple[int, ...]]:
    """Output shape (without the batch) of each layer, from one forward of a blank image."""
    cache = backend.cache("layer_shapes")
    missing = [backend.resolve_layer(l) for l in layers if backend.resolve_layer(l) not in cache]
    if missing:
        h, w = backend.input_size
        with torch.no_grad():
            out = backend.forward(torch.zeros(1, backend.channels, h, w, device=backend.device), missing)
        cache.update({k: tuple(v.shape[1:]) for k, v in out.items()})
    return {l: cache[backend.resolve_layer(l)] for l in layers}


def resolve_units(backend, specs) -> list[Unit]:
    """Parse and check units against the backend; conv units without a position get the centre
    of their map (the original's choice, to avoid edge effects)."""
    if isinstance(specs, (str, Unit)):
        specs = [specs]
    units = [parse_unit(s) for s in specs]
    if not units:
        raise DeepvisError("no units given: name at least one, e.g. unit=fc:130")
    for u in units:
        backend.resolve_layer(u.layer)  # unknown layer -> error listing valid ones
    shapes = layer_shapes(backend, sorted({u.layer for u in units}))
    out = []
    for u in units:
        shape = shapes[u.layer]
        if not 0 <= u.channel < shape[0]:
            raise DeepvisError(f"unit {u}: channel {u.channel} out of range; layer {u.layer} "
                               f"has channels 0..{shape[0] - 1}")
        if len(shape) == 1 or (len(shape) == 3 and shape[1:] == (1, 1)):
            if u.y not in (None, 0) or u.x not in (None, 0):
                raise DeepvisError(f"unit {u}: layer {u.layer} has no spatial positions")
            out.append(Unit(u.layer, u.channel) if len(shape) == 1 else Unit(u.layer, u.channel, 0, 0))
            continue
        h, w = shape[-2:]
        y, x = (h // 2, w // 2) if u.y is None else (u.y, u.x)
        if not (0 <= y < h and 0 <= x < w):
            raise DeepvisError(f"unit {u}: position ({y}, {x}) out of range; layer {u.layer} "
                               f"is {h}x{w} (y in 0..{h - 1}, x in 0..{w - 1})")
        out.append(Unit(u.layer, u.channel, y, x))
    return out


def gather_units(acts: dict, units: list[Unit]) -> torch.Tensor:
    """Value of units[i] in image i of the batch -> (N,)."""
    vals = []
    for i, u in enumerate(units):
        a = acts[u.layer]
        vals.append(a[i, u.channel] if a.dim() == 2 else a[i, u.channel, u.y, u.x])
    return torch.stack(vals)


def is_whole_layer(spec) -> bool:
    """'blocks.10:all': every channel of a layer (the atlas's unit grammar)."""
    return isinstance(spec, str) and spec.strip().endswith(":all")


def expand_units(backend, specs) -> list[Unit]:
    """'layer:all' -> every channel of the layer; other specs as resolve_units parses them."""
    if isinstance(specs, (str, Unit)):
        specs = [specs]
    out = []
    for spec in specs:
        s = str(spec).strip()
        if is_whole_layer(s):
            layer = backend.resolve_layer(s[:-4])
            out += [f"{layer}:{c}" for c in range(layer_shapes(backend, [layer])[layer][0])]
        else:
            out.append(spec)
    return resolve_units(backend, out)
