"""The live view's two worker threads: capture (keeps the newest frame) and network (always
takes the newest frame and settings, publishes an immutable snapshot). The drawing never reads a
snapshot while the network writes it: the network builds a new one and swaps one reference.

Network speed has one definition everywhere (status line, stats, benchmark): passes per second
of the network's own time, 1 / (mean seconds per pass), i.e. the rate it sustains; how often it
actually ran (it idles when neither the frame nor the settings change) is ``net_passes``.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..attention import attention_module, capture_attention, query_maps
from ..backprop import MODES, backprop, gradient_image, smooth_activations
from ..errors import DeepvisError
from ..layout import PREFIX
from ..labels import top_classes
from ..numerics import Numerics
from .settings import BOOST_GAMMA, BOOST_INDIV, ViewSettings
from .sources import Source
from .tiles import tile_layer


#: A network that fails this long without a success ends the view (exit status 2).
FATAL_AFTER_SECONDS = 5.0


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
    warning: str = ""
    layout: str = ""             # the layer's layout as the layer table writes it ('tokens 14x14 + cls')
    prefix: tuple = ()           # the selected channel's prefix tokens: (name, level 0..1, value) each
    attention: str = ""          # what the grid shows when it shows attention (empty: the channels)
    back_note: str = ""          # how deconv / guided read this network's smooth activations


class Capture(threading.Thread):
    """Reads the source continuously; keeps only the newest frame (and a counter). Stepping
    through files (e / w) is asked of this thread, so a slow or stuck file never blocks the
    drawing thread."""

    def __init__(self, source: Source, period: float = 1 / 30):
        super().__init__(daemon=True, name="capture")
        self.source, self.period = source, period
        self.lock = threading.Lock()
        self.frame, self.frame_id, self.frozen = None, 0, False
        self.stop = threading.Event()
        self.wake = threading.Event()
        self._last = None
        self._steps: collections.deque = collections.deque()
        self.busy_since: float | None = None  # set while a read is in progress

    def poll(self):
        with self.lock:
            src = self.source
        self.busy_since = time.perf_counter()
        try:
            f = src.read()
        finally:
            self.busy_since = None
        with self.lock:
            if f is not None and f is not self._last and not self.frozen and src is self.source:
                self._last, self.frame = f, f
                self.frame_id += 1

    def step(self, direction: int):
        """Next (+1) / previous (-1) file, done in this thread."""
        self._steps.append(direction)
        self.wake.set()

    @property
    def settled(self) -> bool:
        """No file step waiting or being read (headless runs wait for this before a screenshot)."""
        return not self._steps and self.busy_since is None

    def run(self):
        while not self.stop.is_set():
            try:
                while self._steps:
                    d = self._steps.popleft()
                    self.busy_since = time.perf_counter()
                    try:
                        (self.source.next if d > 0 else self.source.prev)()
                    finally:
                        self.busy_since = None
                self.poll()
            except Exception as e:  # a broken camera or stream must not kill the view
                self.source.message = f"capture error: {e}"
            self.wake.wait(self.period)
            self.wake.clear()

    def latest(self):
        with self.lock:
            return self.frame, self.frame_id

    def switch(self, source: Source):
        with self.lock:
            self.source, self._last = source, None
        self.wake.set()

    @property
    def stuck_for(self) -> float:
        t = self.busy_since
        return 0.0 if t is None else time.perf_counter() - t


class Network(threading.Thread):
    def __init__(self, backend, capture: Capture, settings, numerics: str = "default", layers=None):
        """settings: a callable giving the newest ViewSettings (the drawing thread replaces them;
        this thread only reads): the network gets what it computes from, not the app."""
        super().__init__(daemon=True, name="network")
        self.backend, self.capture, self.settings = backend, capture, settings
        self.layers = list(layers or backend.layers)  # the view's layer list (ViewSettings.layer indexes it)
        self.numerics = Numerics(numerics)
        self.snapshot: Snapshot | None = None
        self.passes, self.busy_seconds = 0, 0.0
        self.recent = collections.deque(maxlen=10)  # seconds of the last passes (status line)
        self.log = collections.deque(maxlen=100_000)  # (end time, seconds) of every pass (benchmarks)
        self.running_since, self.running_until = None, None  # the thread's own span (stats)
        self.error = None
        self.failing_since: float | None = None
        self.stop = threading.Event()
        self._info: dict = {}  # layer -> (Layout, attention module or None)
        smooth = smooth_activations(backend.module) if isinstance(getattr(backend, "module", None), torch.nn.Module) else []
        self.back_note = (f"{'/'.join(smooth[:3])}: deconv takes the gradient's positive part, guided the "
                          "derivative's, then its positive part (README)") if smooth else ""

    def layer_info(self, layer):
        """The layer's Layout and its attention module (deepvis_repro/attention.py), found once."""
        info = self._info.get(layer)
        if info is None:
            info = self._info[layer] = (self.backend.layer_layout(layer), attention_module(self.backend, layer))
        return info

    def run(self):
        self.running_since = time.perf_counter()
        try:
            self._loop()
        finally:
            self.running_until = time.perf_counter()

    @property
    def running_seconds(self) -> float:
        if self.running_since is None:
            return 0.0
        return (self.running_until or time.perf_counter()) - self.running_since

    def _loop(self):
        last = None
        while not self.stop.is_set():
            frame, fid = self.capture.latest()
            s = self.settings()
            if frame is None or (fid, s) == last:
                self.stop.wait(0.003)
                continue
            t = time.perf_counter()
            try:
                snap = self.compute(frame, fid, s)
            except Exception as e:  # shown on screen; the window stays responsive
                self.error = f"network error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                self.failing_since = self.failing_since or t
                last = (fid, s)
                continue
            self.error, self.failing_since = None, None
            self.snapshot = snap  # one reference swap: the drawing never sees a half-made one
            last = (fid, s)
            dt = time.perf_counter() - t
            self.passes += 1
            self.busy_seconds += dt
            self.recent.append(dt)
            self.log.append((t + dt, dt))

    @property
    def fps(self) -> float:
        """Passes per second of network time over the last passes (0 before the first)."""
        return len(self.recent) / sum(self.recent) if self.recent else 0.0

    @property
    def fatal(self) -> str | None:
        """The error, once the network has failed without a success for FATAL_AFTER_SECONDS."""
        if self.failing_since and time.perf_counter() - self.failing_since > FATAL_AFTER_SECONDS:
            return self.error
        return None

    @torch.no_grad()
    def _forward(self, x, layer, prefix: bool = False):
        b = self.backend
        want = [layer] + ([layer + PREFIX] if prefix else []) + (["prob"] if b.labels and "prob" in b.layers else [])
        return b.forward(x, want)

    def compute(self, frame, fid, s: ViewSettings) -> Snapshot:
        with self.numerics.active(self.backend.device):  # here: autocast is per thread
            return self._compute(frame, fid, s)

    def _compute(self, frame, fid, s: ViewSettings) -> Snapshot:
        b = self.backend
        t = time.perf_counter()
        x = b.preprocess(frame, crop=s.crop)
        layer = self.layers[s.layer]
        layout, attn_module = self.layer_info(layer)
        watching = s.attention and attn_module is not None
        with (capture_attention(attn_module) if watching else contextlib.nullcontext([])) as attn:
            acts = self._forward(x, layer, prefix=bool(layout.prefix))
        a = acts[layer][0].float().cpu().numpy()
        warning = "" if np.isfinite(a).all() else f"layer {layer} holds NaN or inf values (shown as 0)"
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        back_img, grid_src = None, a
        mode = MODES[s.back]
        if mode != "off":
            bl, bc = s.frozen or (layer, s.unit)
            gx, g_layer, _ = backprop(b, x, bl, bc, mode, also=layer if s.back_diffs else None)
            back_img = gradient_image(torch.nan_to_num(gx), s.back_norm)
            if s.back_diffs:
                grid_src = np.zeros_like(a) if g_layer is None else np.nan_to_num(g_layer.float().cpu().numpy())
        unit = min(s.unit, len(a) - 1)
        grid, rc, hw = tile_layer(grid_src, BOOST_INDIV[s.boost], BOOST_GAMMA[s.gamma])
        shown = ""
        if s.attention:
            grid, rc, hw, shown, problem = self._attention_grid(layer, layout, attn_module, attn, a[unit], unit)
            warning = warning or problem
            if problem:
                grid, rc, hw = tile_layer(grid_src, BOOST_INDIV[s.boost], BOOST_GAMMA[s.gamma])
        um = grid_src[unit] if grid_src.ndim == 3 else grid_src[unit:unit + 1][:, None]
        lo, hi = float(grid_src.min()), float(grid_src.max())
        unit_map = ((um - lo) / (hi - lo) if hi > lo else np.zeros_like(um)).astype(np.float32)
        prefix = ()
        if layout.prefix and layer + PREFIX in acts:
            pv = np.nan_to_num(acts[layer + PREFIX][0, unit].float().cpu().numpy())  # (P,)
            prefix = tuple((name, float(np.clip((v - lo) / (hi - lo), 0, 1)) if hi > lo else 0.0, float(v))
                           for name, v in zip(layout.prefix, pv))
        top5 = []
        if "prob" in acts:
            p = acts["prob"][0]
            if not torch.isfinite(p).all():
                warning = warning or "the model's probabilities are NaN: it cannot classify this input"
                p = torch.nan_to_num(p, nan=0.0)
            top5 = [(label, q) for _, label, q in top_classes(b.labels, p[None], 5)[0]]
        return Snapshot(s, fid, b.deprocess(x), grid, rc, hw, len(a), unit_map, top5, back_img,
                        time.perf_counter() - t, warning, layout.describe(), prefix, shown,
                        self.back_note if mode in ("deconv", "guided") else "")

    @staticmethod
    def _attention_grid(layer, layout, module, attn, unit_map, unit):
        """The grid of attention maps (one tile per head) from the patch where the unit is
        strongest: (grid, rows x cols, tile size, caption, problem). A problem (no attention in
        the layer, windowed attention) is said and the channels are drawn instead."""
        if module is None:
            return None, None, None, "", f"{layer} has no attention of its own to show (x: back to the channels)"
        if not attn:
            return None, None, None, "", f"{layer}: the attention was not computed in this pass"
        if unit_map.ndim != 2:
            return None, None, None, "", f"{layer} is not a map over patches: no attention to draw"
        y, xx = np.unravel_index(int(np.argmax(unit_map)), unit_map.shape)
        try:
            maps = query_maps(attn[-1][0], layout, len(layout.prefix) + int(y) * unit_map.shape[1] + int(xx))
        except DeepvisError as e:
            return None, None, None, "", str(e)
        grid, rc, hw = tile_layer(maps, 1.0)  # each head to its own peak: heads differ in sharpness
        return grid, rc, hw, f"attention of patch ({y}, {xx}), where unit {unit} is strongest: {len(maps)} heads", ""
