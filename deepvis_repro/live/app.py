"""The live view: a pygame window of every layer's activations while the network watches a
camera, a video or images (the paper's first tool).

Three threads, as in the original: capture (newest frame), network (always takes the newest frame
and the newest view settings, publishes an immutable snapshot) and drawing (the main thread:
events, keys, blitting). The drawing never reads a snapshot while the network writes it: the
network builds a new one and swaps a single reference.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import DeepvisError
from ..units import layer_shapes
from .backprop import MODES, backprop, gradient_image
from .sources import Source, WebcamSource
from .tiles import grid_shape, tile_layer

BOOST_INDIV = (0.0, 0.3, 0.5, 0.8, 1.0)
BOOST_GAMMA = (1.0, 0.7, 0.5, 0.3)

HELP = [
    ("arrows / i j k l", "move the selected unit (capitals: by 3)"),
    ("u / o", "previous / next layer"),
    ("b", "back mode: off, gradient, deconv, guided"),
    ("n", "back image raw / as a norm"),
    ("a", "grid: activations / back diffs"),
    ("d", "freeze the backprop unit while the cursor roams"),
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
    """What the user chose; replaced (never mutated) by the drawing thread, read by the network."""
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


@dataclass(frozen=True)
class Snapshot:
    """One network pass, published whole."""
    settings: ViewSettings
    frame_id: int
    input_image: np.ndarray
    grid: np.ndarray
    grid_rc: tuple
    tile_hw: tuple
    n_channels: int
    unit_map: np.ndarray
    top5: list
    back_image: np.ndarray | None
    seconds: float


class Capture(threading.Thread):
    """Reads the source continuously; keeps only the newest frame (and a counter)."""

    def __init__(self, source: Source, period: float = 1 / 30):
        super().__init__(daemon=True, name="capture")
        self.source, self.period = source, period
        self.lock = threading.Lock()
        self.frame, self.frame_id, self.frozen = None, 0, False
        self.stop = threading.Event()
        self._last = None

    def poll(self):
        with self.lock:
            src = self.source
        f = src.read()
        with self.lock:
            if f is not None and f is not self._last and not self.frozen and src is self.source:
                self._last, self.frame = f, f
                self.frame_id += 1

    def run(self):
        while not self.stop.is_set():
            try:
                self.poll()
            except Exception as e:  # a broken camera or stream must not kill the view
                self.source.message = f"capture error: {e}"
            self.stop.wait(self.period)

    def latest(self):
        with self.lock:
            return self.frame, self.frame_id

    def switch(self, source: Source):
        with self.lock:
            self.source, self._last = source, None
        self.poll()


class Network(threading.Thread):
    def __init__(self, backend, capture: Capture, app: "LiveApp"):
        super().__init__(daemon=True, name="network")
        self.backend, self.capture, self.app = backend, capture, app
        self.snapshot: Snapshot | None = None
        self.passes, self.busy_seconds = 0, 0.0
        self.first_pass = None
        self.error = None
        self.stop = threading.Event()

    def run(self):
        last = None
        while not self.stop.is_set():
            frame, fid = self.capture.latest()
            s = self.app.settings
            if frame is None or (fid, s) == last:
                self.stop.wait(0.003)
                continue
            t = time.perf_counter()
            try:
                snap = self.compute(frame, fid, s)
            except Exception as e:  # shown in the status line; the window stays responsive
                self.error = f"network error: {e}"
                last = (fid, s)
                continue
            self.snapshot = snap  # one reference swap: the drawing never sees a half-made one
            last = (fid, s)
            dt = time.perf_counter() - t
            self.passes += 1
            self.busy_seconds += dt
            self.first_pass = self.first_pass or t

    @torch.no_grad()
    def _forward(self, x, layer):
        b = self.backend
        want = [layer] + (["prob"] if b.labels and "prob" in b.layers else [])
        return b.forward(x, want)

    def compute(self, frame, fid, s: ViewSettings) -> Snapshot:
        b = self.backend
        t = time.perf_counter()
        b.crop = s.crop
        x = b.preprocess(frame)
        layer = b.layers[s.layer]
        acts = self._forward(x, layer)
        a = acts[layer][0].float().cpu().numpy()
        back_img, grid_src = None, a
        mode = MODES[s.back]
        if mode != "off":
            bl, bc = s.frozen or (layer, s.unit)
            gx, g_layer, _ = backprop(b, x, bl, bc, mode, also=layer if s.back_diffs else None)
            back_img = gradient_image(gx, s.back_norm)
            if s.back_diffs:
                grid_src = np.zeros_like(a) if g_layer is None else g_layer.float().cpu().numpy()
        grid, rc, hw = tile_layer(grid_src, BOOST_INDIV[s.boost], BOOST_GAMMA[s.gamma])
        unit = min(s.unit, len(a) - 1)
        um = grid_src[unit] if grid_src.ndim == 3 else grid_src[unit:unit + 1][:, None]
        lo, hi = float(grid_src.min()), float(grid_src.max())
        unit_map = ((um - lo) / (hi - lo) if hi > lo else np.zeros_like(um)).astype(np.float32)
        top5 = []
        if "prob" in acts:
            p = acts["prob"][0]
            v, i = p.topk(5)
            top5 = [(b.labels[j], float(q)) for q, j in zip(v.tolist(), i.tolist())]
        return Snapshot(s, fid, b.deprocess(x), grid, rc, hw, len(a), unit_map, top5, back_img,
                        time.perf_counter() - t)


class LiveApp:
    def __init__(self, backend, source: Source, *, window=(1280, 720), fps: int = 30,
                 max_frames: int | None = None, keys=(), screenshot: str | None = None,
                 stats: str | None = None, layer: str | None = None, sync_timeout: float = 30.0,
                 camera_factory=WebcamSource):
        self.backend, self.source, self.files_source = backend, source, source
        self.window, self.fps = tuple(window), int(fps)
        self.max_frames, self.keys = max_frames, [str(k) for k in (keys or [])]
        self.screenshot, self.stats_path = screenshot, stats
        self.sync_timeout = sync_timeout
        self.camera_factory = camera_factory
        start = backend.layers.index(backend.resolve_layer(layer)) if layer else 0
        # Channel counts up front: the drawing thread must never run the network itself.
        self.channels = {k: v[0] for k, v in layer_shapes(backend, backend.layers).items()}
        self.settings = ViewSettings(layer=start, crop=backend.crop)
        self.message = ""
        self.show_help = False
        self.running = True
        self.frames = 0
        self.keys_handled: list[str] = []

    # ----- settings (drawing thread only) ---------------------------------------------------
    def update(self, **kw):
        self.settings = replace(self.settings, **kw)

    def n_channels(self, layer_index: int) -> int:
        return self.channels[self.backend.layers[layer_index]]

    def move(self, dy: int, dx: int):
        s = self.settings
        n = self.n_channels(s.layer)
        _, cols = grid_shape(n)
        unit = int(np.clip(s.unit + dy * cols + dx, 0, n - 1))
        if unit != s.unit:
            self.update(unit=unit)

    def handle_key(self, name: str):
        """One key by name: a character ('o', 'L', '0') or an arrow ('left', 'up', ...)."""
        s = self.settings
        self.keys_handled.append(name)
        step = 3 if (len(name) == 1 and name.isupper()) or name.startswith("shift+") else 1
        base = name.split("+")[-1]
        low = base.lower() if len(base) == 1 else base
        moves = {"i": (-1, 0), "k": (1, 0), "j": (0, -1), "l": (0, 1),
                 "up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
        if low in moves:
            dy, dx = moves[low]
            self.move(dy * step, dx * step)
        elif base == "u" or base == "o":
            layer = int(np.clip(s.layer + (1 if base == "o" else -1), 0, len(self.backend.layers) - 1))
            self.update(layer=layer, unit=min(s.unit, self.n_channels(layer) - 1))
        elif base == "b":
            self.update(back=(s.back + 1) % len(MODES))
        elif base == "n":
            self.update(back_norm=not s.back_norm)
        elif base == "a":
            self.update(back_diffs=not s.back_diffs)
        elif base == "d":
            self.update(frozen=None if s.frozen else (self.backend.layers[s.layer], s.unit))
        elif base == "z":
            self.update(zoom=not s.zoom)
        elif base == "t":
            self.update(boost=(s.boost + 1) % len(BOOST_INDIV))
        elif base == "T":
            self.update(gamma=(s.gamma + 1) % len(BOOST_GAMMA))
        elif base == "f":
            with self.capture.lock:
                self.capture.frozen = not self.capture.frozen
        elif base == "c":
            self.toggle_camera()
        elif base in ("e", "w"):
            (self.source.next if base == "e" else self.source.prev)()
            self.capture.poll()
        elif base == "0":
            self.update(crop=not s.crop)
        elif base == "h":
            self.show_help = not self.show_help
        elif base in ("q", "escape"):
            self.running = False

    def toggle_camera(self):
        if self.source is not self.files_source:
            self.source.close()
            self.source = self.files_source
        else:
            try:
                self.source = self.camera_factory()
            except DeepvisError as e:
                self.message = str(e).split(";")[0]
                return
        self.capture.switch(self.source)

    # ----- main loop --------------------------------------------------------------------------
    def run(self) -> dict:
        import pygame

        from .draw import Painter

        pygame.display.init()  # not pygame.init(): no audio device is needed (or present)
        pygame.font.init()
        pygame.display.set_caption(f"deepvis-live: {self.backend.name}")
        screen = pygame.display.set_mode(self.window)
        painter = Painter(screen, self)
        self.capture = Capture(self.source)
        self.capture.poll()
        if self.capture.latest()[0] is None:
            raise DeepvisError(f"source {self.source.name} gave no frame")
        self.capture.start()
        self.net = Network(self.backend, self.capture, self)
        self.net.start()
        clock = pygame.time.Clock()
        pending = list(self.keys)
        t0 = time.perf_counter()
        try:
            while self.running:
                for event in pygame.event.get():
                    if event.type == pygame.QUIT:
                        self.running = False
                    elif event.type == pygame.KEYDOWN:
                        self.handle_key(key_name(event))
                if pending and self.frames >= 1:
                    self.handle_key(pending.pop(0))  # one scripted key per frame
                painter.draw(self.net.snapshot)
                pygame.display.flip()
                clock.tick(self.fps)
                self.frames += 1
                if self.max_frames and self.frames >= self.max_frames and not pending:
                    break
            elapsed = time.perf_counter() - t0
            self.wait_for_network()
            painter.draw(self.net.snapshot)
            pygame.display.flip()
            if self.screenshot:
                pygame.image.save(screen, self.screenshot)
        finally:
            self.net.stop.set()
            self.capture.stop.set()
            self.net.join(timeout=10)
            self.capture.join(timeout=2)
            self.source.close()
            pygame.quit()
        stats = self.stats(elapsed)
        if self.stats_path:
            with open(self.stats_path, "w") as f:
                json.dump(stats, f, indent=1)
        return stats

    def wait_for_network(self):
        """Headless runs: let the network catch up with the last key before the screenshot."""
        t = time.perf_counter()
        while time.perf_counter() - t < self.sync_timeout:
            snap = self.net.snapshot
            if snap is not None and snap.settings == self.settings:
                return
            time.sleep(0.01)

    def stats(self, elapsed: float) -> dict:
        net = self.net
        s = self.settings
        span = max(time.perf_counter() - net.first_pass, 1e-9) if net.first_pass else elapsed
        return {
            "frames": self.frames,
            "display_fps": self.frames / max(elapsed, 1e-9),
            "net_passes": net.passes,
            "net_fps": net.passes / max(min(span, elapsed), 1e-9),
            "net_ms_per_pass": 1000 * net.busy_seconds / max(net.passes, 1),
            "seconds": elapsed,
            "keys": self.keys_handled,
            "layer": self.backend.layers[s.layer], "unit": s.unit, "back_mode": MODES[s.back],
            "source": self.source.name, "message": self.status_message(),
        }

    def status_message(self) -> str:
        return " ".join(m for m in (self.message, self.source.message, self.net.error or "") if m)


def key_name(event) -> str:
    import pygame

    special = {pygame.K_LEFT: "left", pygame.K_RIGHT: "right", pygame.K_UP: "up",
               pygame.K_DOWN: "down", pygame.K_ESCAPE: "escape"}
    shift = bool(event.mod & pygame.KMOD_SHIFT)
    if event.key in special:
        return ("shift+" if shift else "") + special[event.key]
    ch = event.unicode or pygame.key.name(event.key)
    return ch.upper() if shift and len(ch) == 1 else ch
