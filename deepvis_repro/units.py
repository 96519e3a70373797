"""Units, written ``layer:channel`` or ``layer:channel:y:x`` everywhere (CLI, configs, files), and
on a token layer (a ViT block) ``layer:channel:cls`` for a prefix token named by the layer's
layout (cls, dist, reg0, ...); ``layer:channel`` there is the centre patch of the grid."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DeepvisError
from .layout import PREFIX


@dataclass(frozen=True)
class Unit:
    layer: str
    channel: int
    y: int | None = None
    x: int | None = None
    token: str | None = None  # a prefix token's name (a ViT's cls), instead of a position

    def __str__(self) -> str:
        pos = f":{self.token}" if self.token else f":{self.y}:{self.x}" if self.y is not None else ""
        return f"{self.layer}:{self.channel}{pos}"

    @property
    def value_layer(self) -> str:
        """The name to ask the backend for: the layer, or its prefix tokens (backend.PREFIX)."""
        return self.layer + PREFIX if self.token else self.layer

    @property
    def slug(self) -> str:
        """A file-name-safe form: fc_130, blocks.5_10_7_7 (a layer's other characters as '-':
        an ONNX layer '/layer3/0/conv1' or '..' can never name a folder)."""
        import re

        s = re.sub(r"[^A-Za-z0-9._+-]", "-", str(self).replace(":", "_"))
        return "-" + s[1:] if s.startswith(".") else s


def parse_unit(spec) -> Unit:
    if isinstance(spec, Unit):
        return spec
    parts = str(spec).strip().split(":")
    try:
        if len(parts) == 2:
            return Unit(parts[0], int(parts[1]))
        if len(parts) == 4:
            return Unit(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))
        if len(parts) == 3 and parts[2].isidentifier():
            return Unit(parts[0], int(parts[1]), token=parts[2])
    except ValueError:
        pass
    raise DeepvisError(f"bad unit '{spec}': write layer:channel, layer:channel:y:x with whole numbers, "
                       "or layer:channel:TOKEN for a prefix token, e.g. fc:130, blocks.5:10:7:7, blocks.3:17:cls")


def shown_layers(backend) -> list[str]:
    """The layers every tool can take: those whose layout is decided (deepvis_repro/layout.py);
    the others are listed by deepvis-inspect and refused by name."""
    return [l for l in backend.layers if backend.layer_layout(l).decided]


def layer_shapes(backend, layers) -> dict[str, tuple[int, ...]]:
    """Output shape (without the batch) of each layer, from one forward of a blank image."""
    cache = backend.cache("layer_shapes")
    for l in layers:  # a layer whose layout is unknown is refused here, in one line, by every tool
        backend.check_layer(l)
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
        if u.token is not None:
            names = backend.layer_layout(u.layer).prefix
            if u.token not in names:
                raise DeepvisError(f"unit {u}: layer {u.layer} has no prefix token '{u.token}'; "
                                   + (f"its prefix tokens: {', '.join(names)}" if names else "it has none"))
            out.append(u)
            continue
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


def value_layers(backend, units: list[Unit]) -> list[str]:
    """The names to ask backend.forward for, to read these units (their layers in network order,
    and the prefix tokens of those that have token units)."""
    layers = sorted({u.layer for u in units}, key=backend.layers.index)
    return layers + sorted({u.value_layer for u in units if u.token})


def gather_units(acts: dict, units: list[Unit], backend=None) -> torch.Tensor:
    """Value of units[i] in image i of the batch -> (N,).

    One indexing op per layer, not one per unit: a unit's own select chain (and its backward, a
    zero tensor of the layer's size per select) is about a dozen ops, and on a GPU each op is a
    kernel launch, so a batch of 256 units spent most of its step launching them. Each unit reads
    its own image's row, so every gradient element gets at most one value: the same bits as the
    per-unit loop."""
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault(u.value_layer if u.token else u.layer, []).append(i)
    parts, order = [], []
    for name, idx in groups.items():
        a = acts[name]
        us = [units[i] for i in idx]
        rows = torch.as_tensor(idx, device=a.device)
        ch = torch.as_tensor([u.channel for u in us], device=a.device)
        if us[0].token:  # a prefix token: (N, C, tokens) indexed by the token's place in the layer's names
            names = backend.layer_layout(us[0].layer).prefix
            parts.append(a[rows, ch, torch.as_tensor([names.index(u.token) for u in us], device=a.device)])
        elif a.dim() == 2:
            parts.append(a[rows, ch])
        else:
            ys = torch.as_tensor([u.y for u in us], device=a.device)
            xs = torch.as_tensor([u.x for u in us], device=a.device)
            parts.append(a[rows, ch, ys, xs])
        order += idx
    if len(parts) == 1:
        return parts[0]  # one layer, in order: the common case
    # several layers (a batch that mixes them): back into the units' order
    return torch.cat(parts)[torch.as_tensor(order).argsort().to(parts[0].device)]


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
