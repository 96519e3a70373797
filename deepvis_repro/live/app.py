"""The live view: a pygame window of every layer's activations while the network watches a
camera, a video or images (the paper's first tool), with the unit pane of an atlas beside it.

Threads, as in the original: capture (newest frame; also steps through files), network (newest
frame and settings in, an immutable snapshot out), the pane loader and the on-demand optimizer
(an atlas's pictures, off the drawing thread), and drawing (the main thread: events, keys,
blitting). The drawing thread never reads a file and never runs the network.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

import numpy as np
import pygame

from ..atlas.store import AtlasReader, AtlasStore
from ..backprop import MODES
from ..errors import DeepvisError
from ..files import check_writable_file, write_bytes, write_json
from ..numerics import Numerics
from ..units import layer_shapes, shown_layers
from .draw import FrameState, Painter, PaneView
from .keys import MOVES, binding, valid_keys
from .network import Capture, Network
from .ondemand import OnDemand
from .pane import PaneLoader
from .settings import BOOST_GAMMA, BOOST_INDIV, ViewSettings
from .sources import Source, WebcamSource
from .tiles import grid_shape


#: The user counts as moving (the on-demand job pauses) this long after a key.
ACTIVE_SECONDS = 0.4


class LiveApp:
    def __init__(self, backend, source: Source, *, window=(1280, 720), fps: int = 30,
                 max_frames: int | None = None, keys=(), screenshot: str | None = None,
                 stats: str | None = None, layer: str | None = None, sync_timeout: float = 30.0,
                 camera_factory=WebcamSource, atlas: str | None = None, on_demand: dict | None = None,
                 numerics: str = "default"):
        self.backend, self.source, self.files_source = backend, source, source
        self.window, self.fps = tuple(window), int(fps)
        self.max_frames, self.keys = max_frames, [str(k) for k in (keys or [])]
        unknown = [k for k in self.keys if binding(k) is None]
        if unknown:  # a scripted key that does nothing would make a run look fine that did not do its job
            raise DeepvisError(f"unknown key(s) in live.keys: {', '.join(unknown)}; valid: {valid_keys()}")
        self.screenshot, self.stats_path = screenshot, stats
        for path, what in ((screenshot, "live.screenshot"), (stats, "live.stats")):
            if path:  # checked before the window opens, not after the run
                check_writable_file(path, what)
        self.sync_timeout = sync_timeout
        self.numerics = Numerics(str(numerics)).mode  # the network's passes (checked before the window)
        self.camera_factory = camera_factory
        # the layers it can draw: those whose layout is decided (the others are listed by inspect)
        self.layers = shown_layers(backend)
        start = self.layers.index(backend.check_layer(layer)) if layer else 0
        # Channel counts up front: the drawing thread must never run the network itself.
        self.channels = {k: v[0] for k, v in layer_shapes(backend, self.layers).items()}
        self.settings = ViewSettings(layer=start, crop=backend.crop)
        self.message = ""
        self.show_help = False
        self.running = True
        self.fatal: str | None = None
        self.frames = 0
        self.keys_handled: list[str] = []
        self.last_key = 0.0
        self.frame_log: list[float] = []  # when each display frame was shown (benchmarks)
        self.atlas_dir = atlas
        self.on_demand_options = dict(on_demand or {})
        self.reader = self._open_atlas(atlas) if atlas else None
        self.loader = self.on_demand = None

    def _open_atlas(self, atlas: str):
        # A path given to read an atlas must be one: a typo would silently start a new, empty one.
        if not os.path.exists(atlas):
            raise DeepvisError(f"atlas folder not found: live.atlas={atlas} (an atlas from deepvis-mine or "
                               "deepvis-optimize; for a new one that on-demand images fill, make the empty "
                               "folder first)")
        if not os.path.isdir(atlas):
            raise DeepvisError(f"live.atlas={atlas} is a file, not an atlas folder")
        if AtlasStore(atlas).manifest() is not None or not os.listdir(atlas):
            AtlasStore(atlas).check_model(self.backend)
        return AtlasReader(atlas)

    # ----- settings (drawing thread only) ---------------------------------------------------
    def update(self, **kw):
        self.settings = replace(self.settings, **kw)

    def n_channels(self, layer_index: int) -> int:
        return self.channels[self.layers[layer_index]]

    def user_active(self) -> bool:
        return time.perf_counter() - self.last_key < ACTIVE_SECONDS

    def move(self, dy: int, dx: int):
        s = self.settings
        n = self.n_channels(s.layer)
        _, cols = grid_shape(n)
        unit = int(np.clip(s.unit + dy * cols + dx, 0, n - 1))
        if unit != s.unit:
            self.update(unit=unit)

    def handle_key(self, name: str):
        """One key by name: a character ('o', 'L', '0') or an arrow ('left', 'shift+up', ...),
        acted on by the method its binding names (keys.py); other keys do nothing."""
        b = binding(name)
        self.keys_handled.append(name)
        self.last_key = time.perf_counter()
        if b is not None:
            getattr(self, f"key_{b.action}")(name.split("+")[-1], name.startswith("shift+"))

    # one method per binding of keys.BINDINGS: key is the key's name without shift+
    def key_move(self, key: str, shift: bool):
        dy, dx = MOVES[key.lower() if len(key) == 1 else key]
        step = 3 if key.isupper() or shift else 1
        self.move(dy * step, dx * step)

    def key_layer(self, key: str, shift: bool):
        s = self.settings
        layer = int(np.clip(s.layer + (1 if key == "o" else -1), 0, len(self.layers) - 1))
        self.update(layer=layer, unit=min(s.unit, self.n_channels(layer) - 1))

    def key_back(self, key: str, shift: bool):
        self.update(back=(self.settings.back + 1) % len(MODES))

    def key_back_norm(self, key: str, shift: bool):
        self.update(back_norm=not self.settings.back_norm)

    def key_back_diffs(self, key: str, shift: bool):
        self.update(back_diffs=not self.settings.back_diffs)

    def key_freeze_unit(self, key: str, shift: bool):
        s = self.settings
        self.update(frozen=None if s.frozen else (self.layers[s.layer], s.unit))

    def key_pattern(self, key: str, shift: bool):
        if self.reader is None:
            self.message = "pattern mode needs an atlas: live.atlas=DIR"
        else:
            self.update(pattern=not self.settings.pattern)

    def key_zoom(self, key: str, shift: bool):
        self.update(zoom=not self.settings.zoom)

    def key_attention(self, key: str, shift: bool):
        self.update(attention=not self.settings.attention)

    def key_boost(self, key: str, shift: bool):
        s = self.settings
        if key == "T":
            self.update(gamma=(s.gamma + 1) % len(BOOST_GAMMA))
        else:
            self.update(boost=(s.boost + 1) % len(BOOST_INDIV))

    def key_freeze_frame(self, key: str, shift: bool):
        with self.capture.lock:
            self.capture.frozen = not self.capture.frozen

    def key_camera(self, key: str, shift: bool):
        self.toggle_camera()

    def key_step_file(self, key: str, shift: bool):
        self.capture.step(+1 if key == "e" else -1)  # read in the capture thread

    def key_crop(self, key: str, shift: bool):
        self.update(crop=not self.settings.crop)

    def key_help(self, key: str, shift: bool):
        self.show_help = not self.show_help

    def key_quit(self, key: str, shift: bool):
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

    # ----- the unit pane ------------------------------------------------------------------------
    def selected(self) -> tuple[str, int]:
        s = self.settings
        return self.layers[s.layer], min(s.unit, self.n_channels(s.layer) - 1)

    def pane_entry(self) -> dict | None:
        """The selected unit's pictures (None while loading); asks for what is missing."""
        if self.loader is None:
            return None
        layer, unit = self.selected()
        self.loader.want(layer, unit)
        entry = self.loader.get(layer, unit)
        if self.on_demand is not None:
            if entry is not None and entry.get("regularized_opt") is None:
                self.on_demand.request(layer, unit)
            elif entry is not None:
                self.on_demand.withdraw()
        return entry

    def frame_state(self, snap):
        """What the painter shows this frame besides the snapshot; asks the pane's loader for the
        selected unit's pictures (and, in pattern mode, the layer's sheet) that are missing."""
        s = self.settings
        pane = sprite = None
        if self.loader is not None:
            layer, unit = self.selected()
            entry = self.pane_entry()
            od = self.on_demand
            making = od.status() if od is not None and od.current and od.current["key"] == (layer, unit) else None
            pane = PaneView(layer, unit, entry, self.reader.top_k, self.reader.back_mode(layer), making,
                            self.reader.reading(layer, unit))
            if s.pattern and snap is not None:
                tile = self.painter.pattern_tile(snap.n_channels)
                sprite = self.loader.sprite(layer, tile)
                if sprite is None:
                    self.loader.want_sprite(layer, snap.n_channels, tile)
        # frames shown in the last second (the main loop's, capped by live.fps); the painter also
        # redraws while a headless run waits for its workers, which are not display frames
        now = time.perf_counter()
        display = sum(1 for t in self.frame_log[-(2 * self.fps + 2):] if now - t < 1.0)
        net = getattr(self, "net", None)
        return FrameState(settings=s, frame_frozen=self.capture.frozen, net_error=net.error if net else None,
                          # the same definition as the stats' net_fps: passes per second of network time
                          net_fps=net.fps if net else 0.0, display_fps=display, source=self.source.name,
                          status=self.status_message(), show_help=self.show_help, pane=pane, sprite=sprite)

    def _start_atlas_threads(self, slot_size):
        if self.reader is None:
            return
        self.loader = PaneLoader(self.reader, slot_size)
        self.loader.start()
        opts = dict(self.on_demand_options)
        if opts.pop("enabled", True):
            self.on_demand = OnDemand(self.backend, self.atlas_dir, self.loader, user_active=self.user_active, **opts)
            self.on_demand.start()

    # ----- main loop --------------------------------------------------------------------------
    def run(self) -> dict:
        pygame.display.init()  # not pygame.init(): no audio device is needed (or present)
        pygame.font.init()
        pygame.display.set_caption(f"deepvis-live: {self.backend.name}")
        screen = pygame.display.set_mode(self.window)
        painter = self.painter = Painter(screen, self.layers, with_pane=self.reader is not None)
        self.capture = Capture(self.source)
        self.capture.poll()
        if self.capture.latest()[0] is None:
            raise DeepvisError(f"source {self.source.name} gave no frame")
        self.net = Network(self.backend, self.capture, lambda: self.settings, numerics=self.numerics,
                           layers=self.layers)
        t0 = time.perf_counter()
        interrupted = None
        try:
            try:
                # The threads start inside the try: a signal at any moment after (a test sends
                # SIGTERM the moment the line below appears) still stops and joins them, rather
                # than leaving the interpreter to exit under a thread inside torch.
                self.capture.start()
                self.net.start()
                # one line when the view runs (a script or a test can wait for it); keys: h in the window
                print(f"deepvis-live: showing {self.source.name} through {self.backend.name}; h for keys, q quits",
                      file=sys.stderr, flush=True)
                self._start_atlas_threads(painter.slot_size)
                t0 = time.perf_counter()
                self._loop(painter)
            except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the view ends in any state, stats written
                interrupted = e
            elapsed = time.perf_counter() - t0
            if interrupted is None:
                self._finish(painter, screen)
        finally:
            threads = [t for t in (self.net, self.capture, self.loader, self.on_demand) if t is not None]
            for t in threads:
                t.stop.set()
            for t in threads:  # each checks its stop between steps; a read stuck in a file is left behind
                if t.is_alive():
                    t.join(timeout=2 if t is self.capture else 10)
            self.source.close()
            pygame.quit()
        stats = self.stats(elapsed)
        if self.stats_path:
            write_json(self.stats_path, stats)
        if interrupted is not None:
            raise interrupted
        if self.fatal:
            raise DeepvisError(f"the network keeps failing, stopped: {self.fatal}")
        return stats

    def _loop(self, painter):
        """Events, one scripted key per frame, drawing at the frame-rate cap."""
        clock = pygame.time.Clock()
        pending = list(self.keys)
        while self.running:
            for event in pygame.event.get():
                if event.type == pygame.QUIT:
                    self.running = False
                elif event.type == pygame.KEYDOWN:
                    self.handle_key(key_name(event))
            if pending and self.frames >= 1:
                self.handle_key(pending.pop(0))
            snap = self.net.snapshot
            painter.draw(snap, self.frame_state(snap))
            pygame.display.flip()
            clock.tick(self.fps)
            self.frames += 1
            self.frame_log.append(time.perf_counter())
            if self.net.fatal:
                self.fatal = self.net.fatal
                return
            if self.max_frames and self.frames >= self.max_frames and not pending:
                return

    def _finish(self, painter, screen):
        """The last frame (after the workers caught up, in headless runs), and the screenshot."""
        if self.fatal is None and self.running:
            self.wait_for_workers(painter)
        snap = self.net.snapshot
        painter.draw(snap, self.frame_state(snap))
        pygame.display.flip()
        if self.screenshot:
            tmp = f"{self.screenshot}.{os.getpid()}.png"
            pygame.image.save(screen, tmp)  # then renamed: the screenshot is whole or absent
            with open(tmp, "rb") as f:
                data = f.read()
            os.unlink(tmp)
            write_bytes(self.screenshot, data)

    def wait_for_workers(self, painter):
        """Headless runs: let the network catch up with the last key, and the pane and an
        on-demand job finish, before the screenshot (at most sync_timeout seconds)."""
        t = time.perf_counter()
        self.last_key = 0.0
        while time.perf_counter() - t < self.sync_timeout:
            snap = self.net.snapshot
            cap = self.capture
            cap_ok = cap.settled
            net_ok = snap is not None and snap.settings == self.settings and (
                self.source.live or snap.frame_id == cap.latest()[1])
            entry = self.pane_entry() if self.loader is not None else {}
            pane_ok = self.loader is None or (entry is not None and self.loader.idle)
            od_ok = self.on_demand is None or not self.on_demand.busy
            if cap_ok and net_ok and pane_ok and od_ok:
                return
            painter.draw(snap, self.frame_state(snap))  # keep drawing: the window stays alive while waiting
            time.sleep(0.02)

    def stats(self, elapsed: float) -> dict:
        net = self.net
        s = self.settings
        layer, unit = self.selected()
        out = {
            "frames": self.frames,
            "display_fps": self.frames / max(elapsed, 1e-9),
            "net_passes": net.passes,
            # one definition of network speed (status line, stats, README): passes per second
            # of network time; net_passes_per_s is how often it ran (it idles on a still frame)
            "net_fps": net.passes / net.busy_seconds if net.busy_seconds else 0.0,
            "numerics": self.numerics,
            "net_ms_per_pass": 1000 * net.busy_seconds / max(net.passes, 1),
            "net_passes_per_s": net.passes / max(net.running_seconds, 1e-9),  # over the thread's own span
            "seconds": elapsed,
            "keys": self.keys_handled,
            "layer": layer, "unit": unit, "back_mode": MODES[s.back], "pattern": s.pattern,
            "source": self.source.name, "message": self.status_message(),
            "error": self.fatal or net.error,
        }
        if self.loader is not None:
            entry = self.loader.get(layer, unit) or {}
            out["pane"] = {"atlas": self.atlas_dir, "layer": layer, "unit": unit,
                           "shown": [k for k, v in entry.items() if v is not None],
                           "missing": [k for k, v in entry.items() if v is None], "loads": self.loader.loads,
                           "reading": self.reader.reading(layer, unit)}
        if self.on_demand is not None:
            out["on_demand"] = {"done": self.on_demand.done, "failed": {f"{l}:{u}": r for (l, u), r in
                                                                        self.on_demand.failed.items()},
                                "setting": self.on_demand.preset.name, "steps": self.on_demand.preset.steps}
        return out

    def status_message(self) -> str:
        parts = [self.message, self.source.message, self.net.error or ""]
        if self.capture.stuck_for > 1.0:
            parts.append(f"reading the next file for {self.capture.stuck_for:.0f} s...")
        if self.on_demand is not None:
            parts.append(self.on_demand.status())
        return " ".join(m for m in parts if m)


def key_name(event) -> str:
    special = {pygame.K_LEFT: "left", pygame.K_RIGHT: "right", pygame.K_UP: "up",
               pygame.K_DOWN: "down", pygame.K_ESCAPE: "escape"}
    shift = bool(event.mod & pygame.KMOD_SHIFT)
    if event.key in special:
        return ("shift+" if shift else "") + special[event.key]
    ch = event.unicode or pygame.key.name(event.key)
    return ch.upper() if shift and len(ch) == 1 else ch
