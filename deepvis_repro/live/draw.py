"""Drawing the live view's panes with pygame. Surfaces are rebuilt only when a new snapshot (or a
new pane picture) arrives, so the display rate does not depend on the network's or the disk's.

Layout (1280x720 by default): input and back image | selected unit, top-5, layers | the grid of the
layer's channels | with an atlas, the unit pane (optimized image, top-9, their deconv).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pygame

from ..backprop import MODES
from .keys import HELP
from .pane import SLOTS
from .settings import ViewSettings


BG = (24, 24, 28)
FG = (230, 230, 230)
DIM = (150, 150, 160)
ACCENT = (255, 200, 40)
FROZEN = (80, 200, 255)
ERROR = (255, 90, 80)
PANE = 300
UNIT_PANE = 220      # width of the atlas pane column
STATUS_H = 26
CAPTION_H = 18
READING_H = 34       # two lines of small text under the unit pane's slots


def surface_from(img: np.ndarray) -> pygame.Surface:
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return pygame.surfarray.make_surface(np.ascontiguousarray(a.transpose(1, 0, 2)))


def fit(size, box):
    """Largest (w, h) with the aspect of size that fits in box."""
    w, h = size
    s = min(box[0] / w, box[1] / h)
    return max(1, int(w * s)), max(1, int(h * s))


def centred(surf, box) -> tuple[int, int]:
    """Where surf goes to sit in the middle of box."""
    return box.x + (box.width - surf.get_width()) // 2, box.y + (box.height - surf.get_height()) // 2


def wrap_words(text: str, font, width: int, lines: int) -> list[str]:
    """Up to ``lines`` lines of the text that fit the width in the font; the last one ends in
    '...' where the text does not fit."""
    out, cur = [], ""
    words = text.split()
    for i, w in enumerate(words):
        trial = f"{cur} {w}".strip()
        if font.size(trial)[0] <= width or not cur:
            cur = trial
            continue
        out.append(cur)
        cur = w
        if len(out) == lines:
            break
    else:
        out.append(cur)
        return out[:lines]
    last = out[-1]
    while last and font.size(last + "...")[0] > width:
        last = last[:-1]
    out[-1] = last.rstrip(", ") + "..."
    return out


@dataclass(frozen=True)
class PaneView:
    """The unit pane's content for one frame: the selected unit, its pictures (None while they
    load), the atlas's captions, and what an on-demand job making its optimized image says."""
    layer: str
    unit: int
    entry: dict | None
    top_k: int
    back_mode: str
    making: str | None = None
    reading: str | None = None   # "its top patches look like: ..." (atlas/reading.py), where stored


@dataclass(frozen=True)
class FrameState:
    """What one frame shows besides the network's snapshot, made by the app (the drawing thread)
    and handed to the painter: the painter reads nothing else of the app."""
    settings: ViewSettings
    frame_frozen: bool = False
    net_error: str | None = None
    net_fps: float = 0.0
    display_fps: int = 0
    source: str = ""
    status: str = ""
    show_help: bool = False
    pane: PaneView | None = None
    sprite: tuple | None = None  # pattern mode: (image, layout, ...) of every unit's optimized image


def layer_window(n: int, current: int, rows: int) -> int:
    """First layer shown when rows of n fit: the selection stays in view, near the middle, and
    the list never scrolls past its end."""
    return max(0, min(current - rows // 2, n - rows))


class Painter:
    def __init__(self, screen, layers: list[str], with_pane: bool = False):
        self.screen, self.layers = screen, list(layers)
        self.font = pygame.font.Font(None, 20)
        self.small = pygame.font.Font(None, 17)
        self.big = pygame.font.Font(None, 24)
        self._snap = None
        self._surf = {}
        self._pane_key, self._pane_surf = None, {}
        self._sprite_key, self._sprite_surf = None, None
        W, H = screen.get_size()
        right = UNIT_PANE + 8 if with_pane else 0
        # the grid, its caption below it, then the status bar: nothing overlaps
        self.grid_box = pygame.Rect(2 * PANE + 24, 8, W - 2 * PANE - 32 - right, H - STATUS_H - CAPTION_H - 16)
        self.pane_box = pygame.Rect(W - UNIT_PANE - 8, 8, UNIT_PANE, H - STATUS_H - 16) if with_pane else None
        # the unit's reading gets two lines under the last slot
        slot_h = ((self.pane_box.height - READING_H) // len(SLOTS) - CAPTION_H) if with_pane else 0
        self.slot_size = (UNIT_PANE, slot_h)

    def text(self, s, pos, color=FG, font=None):
        # A file name that is not UTF-8 arrives with surrogate escapes, which SDL cannot render
        s = str(s).encode("utf-8", "replace").decode("utf-8")
        self.screen.blit((font or self.font).render(s, True, color), pos)

    def _rebuild(self, snap):
        scale = pygame.transform.scale  # nearest neighbour: activation pixels stay crisp
        # the input and its back image keep the network's aspect ratio (a 48x192 input is not a square)
        inp = surface_from(snap.input_image)
        self._surf = {"input": scale(inp, fit(inp.get_size(), (PANE, PANE)))}
        g = surface_from(snap.grid)
        self._grid_size = fit(g.get_size(), self.grid_box.size)
        self._surf["grid"] = scale(g, self._grid_size)
        u = (np.clip(np.nan_to_num(snap.unit_map), 0, 1) * 255).astype(np.uint8)
        self._unit_h = PANE - (30 if snap.prefix else 0)  # room for the prefix tokens below the map
        self._surf["unit"] = scale(surface_from(u), fit(u.shape[::-1], (PANE, self._unit_h)))
        if snap.back_image is not None:
            back = surface_from(snap.back_image)
            self._surf["back"] = pygame.transform.smoothscale(back, fit(back.get_size(), (PANE, PANE)))
        self._snap = snap

    def draw(self, snap, f: FrameState):
        scr = self.screen
        scr.fill(BG)
        if snap is None:
            msg = f.net_error or "starting the network..."
            self.text(msg, (20, 20), ERROR if "error" in msg else FG, self.big)
            return
        if snap is not self._snap:
            self._rebuild(snap)
        s = f.settings
        layer_name = self.layers[s.layer]
        # column 1: input, back image
        pygame.draw.rect(scr, (40, 40, 46), (8, 8, PANE, PANE))
        scr.blit(self._surf["input"], centred(self._surf["input"], pygame.Rect(8, 8, PANE, PANE)))
        self.text("input" + ("  [frame frozen]" if f.frame_frozen else ""), (12, 10), ACCENT, self.small)
        back_rect = pygame.Rect(8, PANE + 16, PANE, PANE)
        pygame.draw.rect(scr, (40, 40, 46), back_rect)
        if MODES[s.back] != "off" and "back" in self._surf:
            scr.blit(self._surf["back"], centred(self._surf["back"], back_rect))
            label = f"{MODES[s.back]}{' norm' if s.back_norm else ''} from "
            label += f"{s.frozen[0]}:{s.frozen[1]} (frozen)" if s.frozen else f"{layer_name}:{s.unit}"
            self.text(label, (back_rect.x + 4, back_rect.y + 2), ACCENT, self.small)
            if snap.back_note:  # what deconv and guided mean on GELU/SiLU networks: said, not hidden
                words, lines = snap.back_note.split(), [""]
                for w in words:  # wrapped to the pane's width, below it
                    if len(lines[-1]) + len(w) + 1 > 50:
                        lines.append("")
                    lines[-1] = f"{lines[-1]} {w}".strip()
                for i, line in enumerate(lines[:4]):
                    self.text(line, (back_rect.x, back_rect.bottom + 4 + 15 * i), DIM, self.small)
        else:
            self.text("back: off (b)", (back_rect.x + 8, back_rect.y + 8), DIM)
        # column 2: selected unit enlarged, top-5, layer list
        x2 = PANE + 16
        pygame.draw.rect(scr, (40, 40, 46), (x2, 8, PANE, PANE))
        us = self._surf["unit"]
        scr.blit(us, (x2 + (PANE - us.get_width()) // 2, 8 + (self._unit_h - us.get_height()) // 2))
        self.text(f"unit {layer_name}:{s.unit}", (x2 + 4, 10), ACCENT, self.small)
        if snap.prefix:
            self.draw_prefix(snap.prefix, x2, 8 + PANE)
        y = PANE + 16
        if snap.top5:
            self.text(f"top-{len(snap.top5)}", (x2, y), DIM, self.small)
            for k, (label, p) in enumerate(snap.top5):
                yy = y + 16 + k * 19
                pygame.draw.rect(scr, (60, 90, 140), (x2, yy + 2, int(120 * min(max(p, 0.0), 1.0)), 14))
                self.text(f"{p:.3f} {label[:30]}", (x2 + 4, yy), FG)
            y += 16 + 5 * 19 + 8
        self.draw_layer_list(x2, y, scr.get_height() - STATUS_H - 10 - y, s.layer)
        # the grid (or the zoomed unit, or every unit's optimized image)
        gb = self.grid_box
        what = "back diffs" if s.back_diffs and MODES[s.back] != "off" else "activations"
        if s.zoom:
            z = pygame.transform.scale(self._surf["unit"], fit(self._surf["unit"].get_size(), gb.size))
            scr.blit(z, gb.topleft)
        elif s.pattern and self.draw_pattern(f.sprite, s.unit):
            what = "optimized images (pattern mode, s)"
        elif snap.attention:
            scr.blit(self._surf["grid"], gb.topleft)
            what = snap.attention
        else:
            scr.blit(self._surf["grid"], gb.topleft)
            self.highlight(snap, s.unit, ACCENT)
            if s.frozen and s.frozen[0] == layer_name and s.frozen[1] != s.unit:
                self.highlight(snap, s.frozen[1], FROZEN)
            if s.pattern:
                what += " (pattern mode: loading the optimized images...)"
        layout = f", {snap.layout}" if snap.layout and snap.layout != "vector" else ""
        self.text(f"{layer_name}: {snap.n_channels} channels{layout}, {what}", (gb.x, gb.bottom + 4), DIM, self.small)
        if self.pane_box is not None and f.pane is not None:
            self.draw_pane(f.pane)
        problem = f.net_error or snap.warning
        if problem:
            self.banner(problem)
        self.draw_status(f, layer_name)
        if f.show_help:
            self.draw_help()

    def draw_prefix(self, prefix, x, bottom):
        """A token layer's prefix tokens (class, distillation, registers) for the selected channel,
        beside its patch map: one square each, on the map's grey scale, with the value."""
        size, step = 22, 72
        for i, (name, level, value) in enumerate(prefix[:PANE // step]):
            bx = x + 4 + i * step
            by = bottom - size - 4
            g = int(255 * level)
            pygame.draw.rect(self.screen, (g, g, g), (bx, by, size, size))
            pygame.draw.rect(self.screen, ACCENT, (bx, by, size, size), 1)
            self.text(name, (bx + size + 3, by), ACCENT, self.small)
            self.text(f"{value:.3g}", (bx + size + 3, by + 11), FG, self.small)

    def banner(self, msg):
        gb = self.grid_box
        box = pygame.Rect(gb.x, gb.y, gb.width, 28)
        overlay = pygame.Surface(box.size, pygame.SRCALPHA)
        overlay.fill((90, 0, 0, 220))
        self.screen.blit(overlay, box.topleft)
        self.text(msg[:110], (box.x + 8, box.y + 6), ERROR)

    def highlight(self, snap, unit, color):
        rows, cols = snap.grid_rc
        th, tw = snap.tile_hw
        gh, gw = snap.grid.shape[:2]
        sx, sy = self._grid_size[0] / gw, self._grid_size[1] / gh
        r, c = divmod(unit, cols)
        rect = pygame.Rect(self.grid_box.x + int((1 + c * (tw + 1)) * sx) - 1,
                           self.grid_box.y + int((1 + r * (th + 1)) * sy) - 1,
                           max(3, int(tw * sx) + 2), max(3, int(th * sy) + 2))
        pygame.draw.rect(self.screen, color, rect, 2)

    # ----- pattern mode and the unit pane ---------------------------------------------------------
    def pattern_tile(self, channels: int) -> int:
        cols = max(1, int(np.ceil(np.sqrt(channels))))
        rows = int(np.ceil(channels / cols))
        return max(4, min(self.grid_box.width // cols, self.grid_box.height // rows) - 2)

    def draw_pattern(self, sprite, unit: int) -> bool:
        """Every unit's optimized image (the app asked the pane's loader for the sheet at
        pattern_tile's size); False while it loads."""
        if sprite is None:
            return False
        img, layout, _ = sprite
        if self._sprite_key != id(img):
            surf = surface_from(img)
            self._sprite_size = fit(surf.get_size(), self.grid_box.size)
            self._sprite_surf = pygame.transform.smoothscale(surf, self._sprite_size)
            self._sprite_key = id(img)
        self.screen.blit(self._sprite_surf, self.grid_box.topleft)
        if layout is not None:
            rows, cols, t, pad = layout
            s = self._sprite_size[0] / img.shape[1]
            r, c = divmod(unit, cols)
            rect = pygame.Rect(self.grid_box.x + int((pad + c * (t + pad)) * s) - 2,
                               self.grid_box.y + int((pad + r * (t + pad)) * s) - 2, int(t * s) + 4, int(t * s) + 4)
            pygame.draw.rect(self.screen, ACCENT, rect, 2)
        return True

    def draw_pane(self, pane: PaneView):
        pb, entry = self.pane_box, pane.entry
        key = (pane.layer, pane.unit, id(entry))
        if key != self._pane_key:
            self._pane_surf = {k: surface_from(v) for k, v in (entry or {}).items() if v is not None}
            self._pane_key = key
        slot_h = self.slot_size[1]
        for i, (kind, caption) in enumerate(SLOTS):
            title = caption.format(k=pane.top_k, mode=pane.back_mode)
            y = pb.y + i * (slot_h + CAPTION_H)
            self.text(title, (pb.x, y + 2), ACCENT if kind in self._pane_surf else DIM, self.small)
            box = pygame.Rect(pb.x, y + CAPTION_H, pb.width, slot_h)
            pygame.draw.rect(self.screen, (40, 40, 46), box)
            surf = self._pane_surf.get(kind)
            if surf is not None:
                self.screen.blit(surf, (box.x + (box.width - surf.get_width()) // 2, box.y))
            else:
                making = pane.making if kind == "regularized_opt" else None
                msg = "loading..." if entry is None else (making or "missing")
                self.text(msg, (box.x + 8, box.y + slot_h // 2 - 8), DIM, self.small)
        y = pb.y + len(SLOTS) * (slot_h + CAPTION_H) + 2
        for k, line in enumerate(wrap_words(pane.reading or "no reading in this atlas", self.small, pb.width, 2)):
            self.text(line, (pb.x, y + 16 * k), FG if pane.reading else DIM, self.small)

    def draw_layer_list(self, x, y, height, current):
        layers = self.layers
        line = 17
        rows = max(1, height // line - 1)  # entries below the title
        start = layer_window(len(layers), current, rows)
        self.text("layers (u / o)" + (f"  {start + 1}-{min(len(layers), start + rows)} of {len(layers)}"
                                      if len(layers) > rows else ""), (x, y), DIM, self.small)
        for k, name in enumerate(layers[start:start + rows]):
            i = start + k
            mark = "> " if i == current else "  "
            self.text(mark + name[:34], (x, y + line * (k + 1)), ACCENT if i == current else FG, self.small)

    def draw_status(self, f: FrameState, layer_name):
        s = f.settings
        H = self.screen.get_height()
        pygame.draw.rect(self.screen, (10, 10, 12), (0, H - STATUS_H, self.screen.get_width(), STATUS_H))
        back = MODES[s.back] + (" norm" if s.back_norm and s.back else "")
        parts = [f"{layer_name}:{s.unit}", f"Back: {back}", f"Boost: {s.boost}/{s.gamma}",
                 f"net {f.net_fps:.1f} fps", f"display {f.display_fps} fps",
                 f"{'crop' if s.crop else 'stretch'}", f.source]
        msg = f.status
        color = ERROR if f.net_error else FG
        self.text(" | ".join(parts) + (f" | {msg}" if msg else "") + "   (h: help)", (8, H - 21), color)

    def draw_help(self):
        W, H = self.screen.get_size()
        box = pygame.Rect(W // 2 - 300, 50, 600, 40 + 24 * len(HELP))
        overlay = pygame.Surface(box.size, pygame.SRCALPHA)
        overlay.fill((0, 0, 0, 215))
        self.screen.blit(overlay, box.topleft)
        self.text("keys", (box.x + 16, box.y + 12), ACCENT, self.big)
        for k, (key, what) in enumerate(HELP):
            self.text(key, (box.x + 16, box.y + 44 + 24 * k), ACCENT, self.big)
            self.text(what, (box.x + 200, box.y + 44 + 24 * k), FG, self.big)
