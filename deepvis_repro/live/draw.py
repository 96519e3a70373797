"""Drawing the live view's panes with pygame. Surfaces are rebuilt only when a new snapshot
arrives, so the display rate does not depend on the network's."""
from __future__ import annotations

import time

import numpy as np
import pygame

from .backprop import MODES
from .app import HELP

BG = (24, 24, 28)
FG = (230, 230, 230)
DIM = (150, 150, 160)
ACCENT = (255, 200, 40)
FROZEN = (80, 200, 255)
PANE = 300


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


class Painter:
    def __init__(self, screen, app):
        self.screen, self.app = screen, app
        self.font = pygame.font.Font(None, 20)
        self.small = pygame.font.Font(None, 17)
        self.big = pygame.font.Font(None, 24)
        self._snap = None
        self._surf = {}
        self._frame_times = []
        W, H = screen.get_size()
        self.grid_box = pygame.Rect(2 * PANE + 24, 8, W - 2 * PANE - 32, H - 44)

    def text(self, s, pos, color=FG, font=None):
        self.screen.blit((font or self.font).render(str(s), True, color), pos)

    def _rebuild(self, snap):
        scale = pygame.transform.scale  # nearest neighbour: activation pixels stay crisp
        self._surf = {"input": scale(surface_from(snap.input_image), (PANE, PANE))}
        g = surface_from(snap.grid)
        self._grid_size = fit(g.get_size(), self.grid_box.size)
        self._surf["grid"] = scale(g, self._grid_size)
        u = (np.clip(snap.unit_map, 0, 1) * 255).astype(np.uint8)
        self._surf["unit"] = scale(surface_from(u), fit(u.shape[::-1], (PANE, PANE)))
        if snap.back_image is not None:
            self._surf["back"] = pygame.transform.smoothscale(surface_from(snap.back_image), (PANE, PANE))
        self._snap = snap

    def draw(self, snap):
        now = time.perf_counter()
        self._frame_times = [t for t in self._frame_times if now - t < 1.0] + [now]
        scr, app = self.screen, self.app
        scr.fill(BG)
        if snap is None:
            self.text("starting the network...", (20, 20), FG, self.big)
            return
        if snap is not self._snap:
            self._rebuild(snap)
        s = app.settings
        layer_name = app.backend.layers[s.layer]
        # column 1: input, back image
        scr.blit(self._surf["input"], (8, 8))
        self.text("input" + ("  [frame frozen]" if app.capture.frozen else ""), (12, 10), ACCENT, self.small)
        back_rect = pygame.Rect(8, PANE + 16, PANE, PANE)
        pygame.draw.rect(scr, (40, 40, 46), back_rect)
        if MODES[s.back] != "off" and "back" in self._surf:
            scr.blit(self._surf["back"], back_rect)
            label = f"{MODES[s.back]}{' norm' if s.back_norm else ''} from "
            label += f"{s.frozen[0]}:{s.frozen[1]} (frozen)" if s.frozen else f"{layer_name}:{s.unit}"
            self.text(label, (back_rect.x + 4, back_rect.y + 2), ACCENT, self.small)
        else:
            self.text("back: off (b)", (back_rect.x + 8, back_rect.y + 8), DIM)
        # column 2: selected unit enlarged, top-5, layer list
        x2 = PANE + 16
        pygame.draw.rect(scr, (40, 40, 46), (x2, 8, PANE, PANE))
        us = self._surf["unit"]
        scr.blit(us, (x2 + (PANE - us.get_width()) // 2, 8 + (PANE - us.get_height()) // 2))
        self.text(f"unit {layer_name}:{s.unit}", (x2 + 4, 10), ACCENT, self.small)
        y = PANE + 16
        if snap.top5:
            self.text("top-5", (x2, y), DIM, self.small)
            for k, (label, p) in enumerate(snap.top5):
                yy = y + 16 + k * 19
                pygame.draw.rect(scr, (60, 90, 140), (x2, yy + 2, int(120 * p), 14))
                self.text(f"{p:.3f} {label[:30]}", (x2 + 4, yy), FG)
            y += 16 + 5 * 19 + 8
        self.draw_layer_list(x2, y, scr.get_height() - 36 - y, s.layer)
        # the grid (or the zoomed unit)
        gb = self.grid_box
        if s.zoom:
            z = pygame.transform.scale(self._surf["unit"], fit(self._surf["unit"].get_size(), gb.size))
            scr.blit(z, gb.topleft)
        else:
            scr.blit(self._surf["grid"], gb.topleft)
            self.highlight(snap, s.unit, ACCENT)
            if s.frozen and s.frozen[0] == layer_name and s.frozen[1] != s.unit:
                self.highlight(snap, s.frozen[1], FROZEN)
        what = "back diffs" if s.back_diffs and MODES[s.back] != "off" else "activations"
        self.text(f"{layer_name}: {snap.n_channels} channels, {what}", (gb.x, gb.bottom + 2), DIM, self.small)
        self.draw_status(snap, layer_name)
        if app.show_help:
            self.draw_help()

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

    def draw_layer_list(self, x, y, height, current):
        layers = self.app.backend.layers
        line = 17
        fits = max(1, height // line)
        start = max(0, min(current - fits // 2, len(layers) - fits))
        self.text("layers (u / o)", (x, y), DIM, self.small)
        for k, name in enumerate(layers[start:start + fits - 1]):
            i = start + k
            mark = "> " if i == current else "  "
            self.text(mark + name, (x, y + line * (k + 1)), ACCENT if i == current else FG, self.small)

    def draw_status(self, snap, layer_name):
        app, s = self.app, self.app.settings
        H = self.screen.get_height()
        pygame.draw.rect(self.screen, (10, 10, 12), (0, H - 26, self.screen.get_width(), 26))
        net_fps = 1.0 / snap.seconds if snap.seconds else 0.0
        disp = len(self._frame_times)
        back = MODES[s.back] + (" norm" if s.back_norm and s.back else "")
        parts = [f"{layer_name}:{s.unit}", f"Back: {back}", f"Boost: {s.boost}/{s.gamma}",
                 f"net {net_fps:.1f} fps", f"display {disp} fps",
                 f"{'crop' if s.crop else 'stretch'}", app.source.name]
        msg = app.status_message()
        self.text(" | ".join(parts) + (f" | {msg}" if msg else "") + "   (h: help)", (8, H - 21), FG)

    def draw_help(self):
        W, H = self.screen.get_size()
        box = pygame.Rect(W // 2 - 300, 60, 600, 40 + 24 * 15)
        overlay = pygame.Surface(box.size, pygame.SRCALPHA)
        overlay.fill((0, 0, 0, 215))
        self.screen.blit(overlay, box.topleft)
        self.text("keys", (box.x + 16, box.y + 12), ACCENT, self.big)
        for k, (key, what) in enumerate(HELP):
            self.text(key, (box.x + 16, box.y + 44 + 24 * k), ACCENT, self.big)
            self.text(what, (box.x + 200, box.y + 44 + 24 * k), FG, self.big)
