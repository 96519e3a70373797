"""Optimized images made while the user watches: when the selected unit has none in the atlas,
a background thread runs a short optimization, writes the image into the atlas and the pane
shows it.

The live view's own work comes first: the job runs on its own copy of the model (no lock shared
with the network), with one torch thread (PyTorch's OpenMP thread count is per calling thread)
and a lower scheduling priority (nice +10 on its Linux thread); it pauses while the user is moving
the cursor and for a moment after, and it never runs for a unit the user has left before it began.

A layer that ends in a ReLU6 (the embedded model's stem, head and pool) is optimized before its
clamp by default (``pre_activation``, optvis/preactivation.py): under the paper's objective those
units stop within a few steps and the picture is the start noise. The clamp is taken off the job's
own copy of the model only, so the view's passes still see it.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
import time

import torch

from ..atlas.optimized import LayerRecord, write_unit
from ..atlas.store import AtlasStore
from ..optimize import backend_lr_scale, get_preset, optimize
from ..units import resolve_units


class Cancelled(Exception):
    pass


class OnDemand(threading.Thread):
    """Requests come from the drawing thread (``request(layer, unit)``); one job at a time."""

    def __init__(self, backend, atlas_dir: str, loader, preset: str = "paper_3", steps: int = 80,
                 seed: int = 0, threads: int = 1, nice: int = 10, rest_seconds: float = 0.3,
                 user_active=lambda: False, pre_activation: bool = True):
        super().__init__(daemon=True, name="on-demand")
        self.backend = copy.deepcopy(backend)  # its own module and lock: the network never waits
        self.lr_scale = backend_lr_scale(self.backend)
        self.preset = get_preset(preset, steps=steps)
        self.seed, self.threads, self.nice = int(seed), int(threads), int(nice)
        self.pre_activation = bool(pre_activation)
        self.store, self.loader = AtlasStore(atlas_dir), loader
        self.rest_seconds, self.user_active = rest_seconds, user_active
        self.cond = threading.Condition()
        self.request_unit: tuple | None = None
        self.requested_at = 0.0
        self.current: dict | None = None     # {"unit", "step", "steps", "started"}
        self.done: list[dict] = []           # finished jobs: unit, steps, seconds, path
        self.failed: dict = {}               # (layer, unit) -> reason (not retried)
        self.made: set = set()               # units made in this session (never made twice)
        self.stop = threading.Event()
        self._requested_at = 0.0

    def request(self, layer: str, unit: int):
        key = (layer, int(unit))
        with self.cond:
            if key in self.failed or key in self.made or (self.current and self.current["key"] == key):
                return
            if self.request_unit != key:
                self.request_unit, self.requested_at = key, time.perf_counter()
                self.cond.notify()

    def withdraw(self):
        with self.cond:
            self.request_unit = None

    @property
    def busy(self) -> bool:
        with self.cond:
            return self.current is not None or self.request_unit is not None

    def status(self) -> str:
        c = self.current
        if c is None:
            return ""
        paused = " (paused)" if c.get("paused") else ""
        return f"optimizing {c['unit']}: {c['step']}/{c['steps']} steps{paused}"

    def run(self):
        torch.set_num_threads(self.threads)
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        while not self.stop.is_set():
            with self.cond:
                while self.request_unit is None and not self.stop.is_set():
                    self.cond.wait(0.2)
                key, at = self.request_unit, self.requested_at
            if key is None:
                continue
            if time.perf_counter() - at < self.rest_seconds or self.user_active():
                time.sleep(0.05)  # the cursor has not rested on this unit yet
                continue
            with self.cond:
                if self.request_unit != key:
                    continue
                self.request_unit = None
            self._requested_at = at
            self._job(*key)

    def _on_step(self, step, steps):
        c = self.current
        c["step"] = step
        while self.user_active() and not self.stop.is_set():
            c["paused"] = True
            time.sleep(0.05)
        c["paused"] = False
        if self.stop.is_set():
            raise Cancelled

    def _job(self, layer: str, channel: int):
        (unit,) = resolve_units(self.backend, [f"{layer}:{channel}"])
        t0 = time.perf_counter()
        self.current = {"key": (layer, channel), "unit": str(unit), "step": 0, "steps": self.preset.steps,
                        "started": t0, "requested": self._requested_at}
        try:
            r = optimize(self.backend, [unit], preset=self.preset, seed=self.seed, progress=False,
                         lr_scale=self.lr_scale, on_step=self._on_step, pre_activation=self.pre_activation)
            if r.interrupted:
                return
            path = write_unit(self.backend, self.store, unit, r.images[0])
            rec = LayerRecord(self.store, unit.layer)
            clamp = (r.pre_activation or {}).get(unit.layer)
            rec.data.setdefault("on_demand", {})[str(unit.channel)] = {
                "setting": self.preset.name, "steps": self.preset.steps, "seed": self.seed,
                "best_activation": float(r.best_activation[0]),
                **({"pre_activation": clamp} if clamp else {})}
            rec.save()
            self.made.add((layer, channel))
            self.loader.invalidate(layer, channel)
            t1 = time.perf_counter()
            self.done.append({"unit": str(unit), "setting": self.preset.name, "steps": self.preset.steps,
                              "seconds": round(t1 - t0, 2), "path": path,
                              # from the moment the cursor landed on the unit to the image on disk
                              "seconds_since_selected": round(t1 - self._requested_at, 2),
                              "started": t0, "finished": t1})
        except Cancelled:
            pass
        except Exception as e:  # shown in the status line; never retried for this unit
            self.failed[(layer, channel)] = f"{type(e).__name__}: {e}"
        finally:
            self.current = None

