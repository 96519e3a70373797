"""Regularized optimization in image space: the loop that joins the optimizer's parts
(deepvis_repro/optvis/): an objective (each unit's value, units.gather_units), an image
parametrization (the paper's pixels, Lucid's Fourier basis, MACO's phase), robustness transforms
and a step rule (the paper's lr policies and regularizers, or Adam). With the paper's settings it is
an exact, batched port of the original toolbox's gradient optimizer (Yosinski et al. 2015;
../shared/PAPER.md states the rule).

Everything runs in the backend contract's space: mean-subtracted RGB pixels on a 0..255 scale.
Units run in batches of rows; each image's regularization (percentiles included) is its own, so a
batch of N gives the images of N single runs. Under a convergence stop a converged unit's row goes
to the next unit at once (``_Cohort``, ``_drive``): the network keeps seeing full batches.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import DeepvisError
from .images import stretch_around_grey
from .numerics import Numerics
from .optvis.convergence import Convergence
from .optvis.param import make_param
from .optvis.preactivation import layer_clamp, unclamped
from .optvis.presets import PRESETS, Preset, get_preset
from .optvis.rules import make_rule
from .optvis.transforms import Robustness
from .progress import progress as progress_bar
from .units import Unit, gather_units, layer_shapes, resolve_units, value_layers
from .validate import number, whole


__all__ = ["optimize", "OptimizationResult", "Preset", "PRESETS", "get_preset", "calibrate_lr_scale"]

# ----- the optimizer ----------------------------------------------------------------------------


@dataclass
class OptimizationResult:
    units: list[Unit]
    preset: Preset
    images: np.ndarray              # (N,H,W,3) uint8: best image per unit, mean added
    x: torch.Tensor                 # (N,3,H,W) best x per unit (mean-subtracted, 0..255 scale)
    best_activation: np.ndarray     # (N,) the unit's value in its image (with transforms: measured
                                    # without them at the end; history holds the objective)
    best_step: np.ndarray           # (N,)
    history: np.ndarray             # (steps_run, N): objective per step, NaN once stopped
    argmax: np.ndarray              # (steps_run, N): argmax channel of the unit's layer per step
    stopped: dict = field(default_factory=dict)  # unit index -> (step, reason)
    interrupted: bool = False
    lr_scale: float = 1.0
    progress_scale: float = 1.0
    numerics: dict = field(default_factory=lambda: {"mode": "default", "native_reductions": None})
    attribution: np.ndarray | None = None  # (N,H,W) in 0..1: MACO's transparency map (param=maco only)
    converged: dict = field(default_factory=dict)  # unit index -> step its convergence stop came at
    convergence: dict | None = None  # the stop's criterion (Convergence.describe()); None: the full length
    # pre_activation: {layer: the clamp taken off (its module path), or None where it ends in none}
    pre_activation: dict | None = None

    def images_without_mean(self) -> np.ndarray:
        """x itself, centred on grey and scaled to fill 0..255 (the original's 'no mean' image)."""
        x = self.x.detach().cpu()
        x = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).permute(0, 2, 3, 1).numpy()  # grey shown grey
        return np.stack([stretch_around_grey(im) for im in x]) if len(x) else x.astype(np.uint8)


def start_images(backend, n: int, start: str, seed: int) -> torch.Tensor:
    """The starting x of each of n units: the same draw for each, as n single runs would get.
    The draw is numpy's legacy RandomState stream, which numpy keeps fixed across versions and
    machines (torch's randn vectorizes its transcendentals, so its normals depend on the CPU)."""
    rs = np.random.RandomState(int(seed))
    h, w = backend.input_size
    mean = backend.mean_image().detach().cpu().float()
    shape = (backend.channels, h, w)
    if start == "mean_plus_rand":
        x0 = torch.from_numpy(rs.standard_normal(shape).astype(np.float32)) * 10.0
    elif start == "randu":
        x0 = torch.from_numpy(rs.random_sample(shape).astype(np.float32)) * 255.0 - mean
    else:
        x0 = torch.zeros(shape)
    return x0.unsqueeze(0).repeat(n, 1, 1, 1).to(backend.device)


@dataclass
class _Batch:
    """One batch's outcome; history and argmax are (steps run, units in the batch)."""
    best_x: torch.Tensor
    best: np.ndarray
    best_step: np.ndarray
    history: np.ndarray
    argmax: np.ndarray
    stopped: dict
    interrupted: bool
    attribution: np.ndarray | None = None  # (units in the batch, H, W): MACO's, else None
    converged: dict = field(default_factory=dict)  # unit index in the batch -> step it converged at


class _Cohort:
    """Units that started together and step together: one step counter, one parametrization, one
    step rule and one set of transforms, as a batch of single runs. Under a convergence stop a
    stopped unit leaves the rows the network sees, and the driver (``_drive``) fills its place with
    the next units, as a cohort of their own; without one, every row stays to the end."""

    def __init__(self, backend, units, p: Preset, x, seed, lr_scale, progress_scale, converge, offset: int):
        n = self.n = len(units)
        self.units, self.p, self.converge, self.offset, self.backend = units, p, converge, offset, backend
        self.layers = value_layers(backend, units)
        self.param = make_param(backend, p, x, seed)
        self.rule = make_rule(p, self.param, lr_scale, progress_scale)
        self.robust = Robustness(p, backend.input_size, seed)
        self.best_x = x.clone()
        self.best = torch.full((n,), -math.inf, device=x.device, dtype=torch.float64)
        self.best_step = torch.full((n,), -1, dtype=torch.long)
        self.active = torch.ones(n, dtype=torch.bool, device=x.device)
        # MACO's transparency map: where the objective's gradient in image space was large, summed over steps
        self.attribution = torch.zeros(n, *backend.input_size, device=x.device) if p.param == "maco" else None
        # The per-step records, one row a step, written in place: a small tensor kept from every step
        # pins the allocator's heap between the step's large blocks, and a run's peak memory grew with
        # its steps (blocks.2's 24 units, bf16, 200 steps: 1.9 GB with lists of tensors, 1.3 GB so)
        self.history = np.full((p.steps, n), np.nan)
        self.argmax = np.full((p.steps, n), -1, dtype=np.int64)
        self.recorded = [0, 0]  # rows of history and argmax written
        # the best value after each step, for the convergence stop's look back
        self.trace = torch.empty((p.steps, n), dtype=torch.float64, device=x.device) if converge is not None else None
        self.stopped, self.converged = {}, {}
        self.rows = list(range(n))  # the rows the network sees (under a convergence stop: the active ones)
        self.step = 0  # this cohort's own step counter (the preset's schedule, blur every 4th, ...)
        self.done = self.all_stopped = False
        self.interrupted = False
        self.counted = 0  # unit-steps this cohort added to the progress bar (taken back if it is rerun)

    @property
    def running(self) -> int:
        """Rows this cohort sends through the network in its next step."""
        return 0 if self.done else len(self.rows)

    def inputs(self) -> torch.Tensor:
        """1. the image (pixels: x kept valid), and the copies the network sees. Under a
        convergence stop only the rows still running go through the network."""
        self.x = self.param.image()
        self.sub = self.rows if len(self.rows) < self.n else None
        return self.robust(self.x if self.sub is None else self.x[self.sub])

    def wrt(self) -> list[torch.Tensor]:
        return [self.param.leaf] + ([self.x] if self.attribution is not None else [])

    def objective(self, acts: dict) -> torch.Tensor:
        """2. each unit's value in this cohort's rows of ``acts`` (the mean over the transformed
        copies); NaN for a row that did not run."""
        self.acts = acts
        us = self.units if self.sub is None else [self.units[i] for i in self.sub]
        obj = gather_units(acts, us * self.robust.copies, self.backend).float()  # bf16: statistics in float32
        if self.robust.copies > 1:
            obj = obj.view(self.robust.copies, len(us)).mean(0)
        if self.sub is not None:
            obj = torch.full((self.n,), torch.nan, device=obj.device, dtype=obj.dtype).index_put(
                (torch.as_tensor(self.sub, device=obj.device),), obj)
        self.obj = obj
        return obj

    def after(self, grads: list[torch.Tensor], bar) -> None:
        """3.-5. the step's records and stops, then the step itself (and the paper's regularizers)."""
        ii, n, p, converge = self.step, self.n, self.p, self.converge
        g = grads[0]
        x, obj = self.x.detach(), self.obj.detach()
        acts, self.acts, self.x, self.obj = self.acts, None, None, None
        with torch.no_grad():
            seen = None if self.sub is None else {i: m for m, i in enumerate(self.sub)}
            self.argmax[ii] = _argmax_channels(acts, self.units, seen).cpu().numpy()
            self.recorded[1] = ii + 1
            active = self.active
            finite = torch.isfinite(obj) & torch.isfinite(g).flatten(1).all(1)
            for i in torch.nonzero(active & ~finite).flatten().tolist():
                self.stopped[i] = (ii, "NaN or inf in the objective or gradient")
            zero = (g.flatten(1) == 0).all(1)
            for i in torch.nonzero(active & finite & zero).flatten().tolist():
                self.stopped[i] = (ii, "gradient is exactly zero")
            objd = obj.double()
            # under random transforms each step's objective is a noisy estimate: the image kept
            # is the latest one, as Lucid and MACO return (the best draw would be a lucky one)
            improved = active & finite & ((objd > self.best) | self.robust.random)
            self.best = torch.where(improved, objd, self.best)
            self.best_x[improved] = x[improved]
            self.best_step[improved.cpu()] = ii
            self.history[ii] = torch.where(active & finite, objd, torch.nan).cpu().numpy()
            self.recorded[0] = ii + 1
            if self.attribution is not None:
                self.attribution += torch.where(active.view(-1, 1, 1), torch.nan_to_num(grads[-1]).abs().sum(1), 0.0)
            active = active & finite & ~zero
            if converge is not None:
                self.trace[ii] = self.best
                if converge.due(ii + 1) and ii >= converge.window:
                    done = active & converge.converged(self.best, self.trace[ii - converge.window])
                    for i in torch.nonzero(done).flatten().tolist():
                        self.converged[i] = ii
                    active = active & ~done
                self.rows = torch.nonzero(active).flatten().tolist()  # stopped units leave the batch too
            self.active = active
            if not bool(active.any()):
                # every unit has stopped: the rest of the history is NaN (argmax -1), as for any
                # stopped unit; the buffers hold that already
                self.recorded[:] = [p.steps, p.steps]
                bar.update((p.steps - ii) * n)
                self.counted += (p.steps - ii) * n
                self.done = self.all_stopped = True
                return
        if ii < p.steps - 1:
            self.rule.update(self.param, g, obj, active, ii)
        bar.update(n)
        self.counted += n
        self.step += 1
        self.done = self.step >= p.steps

    def result(self) -> "_Batch":
        best = self.best
        if self.robust.random:
            try:
                best = _plain_activation(self.backend, self.units, self.layers, self.best_x, best)
            except KeyboardInterrupt:  # a second Ctrl-C: the objective's values stand in
                self.interrupted = True
        # A signal between a step's two records leaves one a row longer: a step's record is whole
        # or absent (best_x / best are updated together, after both records' values exist)
        rows = min(self.recorded)
        return _Batch(self.best_x, best.cpu().numpy(), self.best_step.numpy(), self.history[:rows],
                      self.argmax[:rows], self.stopped, self.interrupted,
                      None if self.attribution is None else self.attribution.cpu().numpy(), self.converged)


def _drive(backend, units, p: Preset, x0, seed, bar, lr_scale, progress_scale, width: int, on_step=None,
           on_best=None, converge: Convergence | None = None) -> list[tuple[slice, "_Batch"]]:
    """Every unit's run, at most ``width`` rows through the network at once: each step, the live
    cohorts' rows go through the network as one batch, and when rows have left (units stopped
    under a convergence stop) the next units start in their place, as a new cohort. A unit's run
    is its single run's whatever cohort it is in (to the rounding of batched arithmetic); the
    schedule, and so each image's bits, depend only on the units and the width. Without a
    convergence stop rows never leave a cohort early, and this is plain batches of ``width``.
    Returns (slice of units, outcome) per cohort; a Ctrl-C returns what was started; a CUDA OOM
    raises _OutOfMemory with the cohorts finished before it, from the first unit on."""
    n, live, parts, nxt, tick = len(units), [], [], 0, 0
    counted = {}  # a finished cohort's first unit -> the unit-steps it added to the progress bar
    cached = [None, None]  # the live cohorts (their first units) and the layers their units read

    def admit():
        nonlocal nxt
        free = width - sum(c.running for c in live)
        if free > 0 and nxt < n:
            stop = min(n, nxt + free)
            live.append(_Cohort(backend, units[nxt:stop], p, x0[nxt:stop].clone(), seed, lr_scale,
                                progress_scale, converge, nxt))
            nxt = stop

    admit()
    try:
        while live:
            if on_step is not None:
                on_step(tick, p.steps)  # may wait (a paused background job) or raise to cancel
            ins = [c.inputs() for c in live]
            # 2. forward only as deep as the deepest unit; the objective is each unit's value
            key = [c.offset for c in live]
            if key != cached[0]:  # the cohorts changed (each starts at its own unit): their layers anew
                cached[:] = [key, live[0].layers if len(live) == 1
                             else value_layers(backend, [u for c in live for u in c.units])]
            layers = cached[1]
            acts = backend.forward(ins[0] if len(ins) == 1 else torch.cat(ins), layers)
            objs, at = [], 0
            for c, t in zip(live, ins):
                part = acts if len(live) == 1 else {k: v[at:at + len(t)] for k, v in acts.items()}
                objs.append(c.objective(part))
                at += len(t)
            # 3. d obj / d leaf: each image's objective depends on that image only
            wrt = [c.wrt() for c in live]
            grads = torch.autograd.grad(objs, [w for ws in wrt for w in ws],
                                        [torch.ones_like(o) for o in objs])  # no reduction: same bits anywhere
            del acts, ins
            at = 0
            for c, ws in zip(live, wrt):
                c.after(list(grads[at:at + len(ws)]), bar)
                at += len(ws)
                if on_best is not None and not c.all_stopped:
                    on_best(c.step - 1, c.best_x, c.best)  # may raise to stop (a search's early stopping)
            for c in [c for c in live if c.done]:
                parts.append((slice(c.offset, c.offset + c.n), c.result()))
                counted[c.offset] = c.counted
                live.remove(c)
            admit()
            tick += 1
    except KeyboardInterrupt:
        for c in live:
            c.interrupted = True
            parts.append((slice(c.offset, c.offset + c.n), c.result()))
    except torch.cuda.OutOfMemoryError as e:
        # the cohorts finished so far from the segment's start are kept; the rest is run again
        parts.sort(key=lambda part: part[0].start)
        kept = []
        for part in parts:
            if part[0].start != (kept[-1][0].stop if kept else 0):
                break
            kept.append(part)
        bar.update(-sum(c.counted for c in live) - sum(counted[s.start] for s, _ in parts[len(kept):]))
        raise _OutOfMemory(e, kept) from e
    return sorted(parts, key=lambda part: part[0].start)


class _OutOfMemory(Exception):
    """A CUDA out-of-memory error in ``_drive``, with the cohorts that finished before it that
    make a contiguous prefix of its units: ``optimize`` keeps them and runs the rest at half the
    width (a late OOM in a long segment does not redo finished work)."""

    def __init__(self, error: Exception, kept: list):
        super().__init__(str(error))
        self.error, self.kept = error, kept


def _argmax_channels(acts: dict, units: list[Unit], seen: dict | None) -> torch.Tensor:
    """(N,): the argmax channel of each unit's layer at the unit's position, in the unit's row
    (seen: batch index -> row, for the rows still running; -1 for a unit whose row did not run).
    One op per layer, not per unit (units.gather_units says why)."""
    out = torch.full((len(units),), -1, dtype=torch.long, device=next(iter(acts.values())).device)
    by_layer: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        if seen is None or i in seen:
            by_layer.setdefault(u.layer, []).append(i)
    for layer, idx in by_layer.items():
        a = acts[layer]
        rows = torch.as_tensor([i if seen is None else seen[i] for i in idx], device=a.device)
        if a.dim() == 4:  # (rows, C) at each unit's position (a unit without one: the first)
            ys = torch.as_tensor([units[i].y or 0 for i in idx], device=a.device)
            xs = torch.as_tensor([units[i].x or 0 for i in idx], device=a.device)
            vals = a[rows, :, ys, xs]
        else:
            vals = a[rows].flatten(1)
        out[torch.as_tensor(idx, device=out.device)] = vals.argmax(1)
    return out


def _plain_activation(backend, units, layers, x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Each unit's value in its image as it is, without transforms (what the harness, the atlas and
    the search compare across settings); a unit that never stepped keeps its fallback."""
    with torch.no_grad():
        value = gather_units(backend.forward(x, layers), units, backend).double()
    return torch.where(torch.isfinite(fallback), value, fallback)


def _pad_rows(a: np.ndarray, rows: int, fill) -> np.ndarray:
    """a (r, k) -> (rows, k), the missing steps filled (an interrupted batch ran fewer)."""
    out = np.full((rows, a.shape[1]), fill, dtype=float)
    out[:len(a)] = a
    return out


def backend_lr_scale(backend) -> float:
    """The backend's lr_scale; a backend that leaves it None (or 'auto') is calibrated once, by
    the backend (Backend.calibrated_lr_scale)."""
    return float(backend.calibrated_lr_scale)


def optimize(backend, units, preset="paper_3", steps: int | None = None, seed: int = 0,
             batch_size: int | None = None, progress: bool = True, lr_scale: float | None = None,
             progress_scale: float | None = None, on_step=None, numerics: str = "default",
             on_best=None, converge: Convergence | None = None, pre_activation: bool = False,
             **overrides) -> OptimizationResult:
    """Find, for each unit, the image that maximizes it under a preset's regularization.

    units: "layer:channel" or "layer:channel:y:x" strings (conv units default to the centre).
    preset: a name in PRESETS, a Preset or a dict; keyword overrides change single fields.
    lr_scale: multiplies the preset's learning rates (lr, max_lr); default the backend's own.
    progress_scale: multiplies the progress policies' desired progress; default the backend's own.
    batch_size: rows through the network at once (all units by default; halved automatically on a
    CUDA OOM, for the units not finished before it). Under ``converge`` a unit that stops leaves its row to the next unit (``_drive``).
    on_step: called as on_step(step, steps) before each step (it may sleep, or raise to stop).
    on_best: called as on_best(step, best_x, best_activation) after each step, with the batch's
    best x so far (a search scores the images on the way, to stop hopeless settings early).
    numerics: "default" (the fastest float32 kernels), "portable" (the same bits on any x86-64 CPU
    and thread count, about 1.5x the time: deepvis_repro/numerics.py) or "bf16" (the network in
    bfloat16: faster where the hardware has it; deepvis_repro/bf16.py).
    converge: a Convergence stops each unit once its objective has converged (the atlas's fast
    mode; optvis/convergence.py); None runs the setting's full length, as the paper did.
    pre_activation: a unit of a layer that ends in a clamp (ReLU, ReLU6) is optimized before it
    (optvis/preactivation.py); batches then hold one layer each. Off: the paper's values.
    Ctrl-C stops early and returns the best images so far (result.interrupted is True).
    """
    p = get_preset(preset, steps=steps, **overrides)
    mode = Numerics(numerics)
    units = resolve_units(backend, units)
    # a negative scale would minimize, 0 / nan / inf would return the start noise as "optimized"
    lr_scale = number("lr_scale", backend_lr_scale(backend) if lr_scale is None else lr_scale, positive=True)
    progress_scale = number("progress_scale", getattr(backend, "progress_scale", 1.0)
                            if progress_scale is None else progress_scale, positive=True)
    seed = whole("seed", seed, 0)
    n = len(units)
    x0 = start_images(backend, n, p.start, seed)
    size = whole("batch_size", batch_size or n, 1)
    parts: list[tuple[slice, _Batch]] = []
    with progress_bar(total=p.steps * n, desc=f"optimize {p.name}", unit="unit-step", enabled=progress,
                      leave=False) as bar:
        start = 0
        while start < n:
            # a segment: the units run together (pre_activation: one layer's, since a clamp taken
            # off for one layer would change a deeper layer's values)
            stop = n
            if pre_activation:
                stop = next((i for i in range(start + 1, n) if units[i].layer != units[start].layer), n)
            chunk = slice(start, stop)
            try:
                with mode.active(backend.device), (unclamped(backend, [units[start].layer]) if pre_activation
                                                   else contextlib.nullcontext()):
                    done = _drive(backend, units[chunk], p, x0[chunk], seed, bar, lr_scale, progress_scale,
                                  size, on_step, on_best, converge)
            except _OutOfMemory as oom:
                if size == 1:
                    raise oom.error from None
                kept = oom.kept
            else:
                kept = None
            if kept is not None:  # out of the except clause: its traceback held the failed step's tensors
                # the units finished before it stand; the rest of the segment again, at half the width
                parts += [(slice(start + s.start, start + s.stop), b) for s, b in kept]
                start += kept[-1][0].stop if kept else 0
                size = max(1, size // 2)
                torch.cuda.empty_cache()
                continue
            parts += [(slice(start + s.start, start + s.stop), b) for s, b in done]
            start = parts[-1][0].stop if done else stop
            if any(b.interrupted for _, b in done):
                break
    batches = [b for _, b in parts]
    units = units[:parts[-1][0].stop if parts else 0]
    best_x = torch.cat([b.best_x for b in batches]) if batches else x0[:0]
    steps_run = max((len(b.history) for b in batches), default=0)
    stopped = {chunk.start + i: v for chunk, b in parts for i, v in b.stopped.items()}
    converged = {chunk.start + i: v for chunk, b in parts for i, v in b.converged.items()}
    return OptimizationResult(
        units=units, preset=p, images=backend.deprocess(best_x).reshape(len(units), *backend.input_size, 3),
        x=best_x, best_activation=np.concatenate([b.best for b in batches]) if batches else np.zeros(0),
        best_step=np.concatenate([b.best_step for b in batches]) if batches else np.zeros(0, int),
        history=np.concatenate([_pad_rows(b.history, steps_run, np.nan) for b in batches], axis=1)
        if batches else np.zeros((0, 0)),
        argmax=np.concatenate([_pad_rows(b.argmax, steps_run, -1) for b in batches], axis=1).astype(int)
        if batches else np.zeros((0, 0), int),
        stopped=stopped, interrupted=any(b.interrupted for b in batches), lr_scale=lr_scale,
        progress_scale=progress_scale, numerics=mode.report(), attribution=_attribution(batches),
        converged=converged, convergence=None if converge is None else converge.describe(),
        pre_activation={u.layer: layer_clamp(backend, u.layer) for u in units} if pre_activation else None)


def _attribution(batches: list[_Batch]) -> np.ndarray | None:
    """MACO's transparency maps, each scaled to 0..1 (None unless param=maco)."""
    maps = [b.attribution for b in batches if b.attribution is not None]
    if not maps:
        return None
    a = np.concatenate(maps)
    top = a.reshape(len(a), -1).max(1).reshape(-1, 1, 1) if len(a) else 1.0
    return (a / np.maximum(top, 1e-30)).astype(np.float32)


def calibrate_lr_scale(backend, layer: str = "fc", n_units: int = 32, seed: int = 0) -> float:
    """The lr_scale at which the paper's constant lr (100) equals the 'progress' policy's own
    step (desired_prog 2 / ||g||^2) at the start, median over n_units channels of ``layer``.

    The paper's settings pair a constant lr of 100 with progress policies capped at max_lr 100,
    i.e. on CaffeNet the two agree in scale; this carries that agreement to any backend."""
    channels = layer_shapes(backend, [layer])[layer][0]
    idx = torch.linspace(0, channels - 1, min(n_units, channels)).round().long().tolist()
    units = resolve_units(backend, [f"{layer}:{c}" for c in idx])
    x = start_images(backend, len(units), "mean_plus_rand", seed).requires_grad_(True)
    obj = gather_units(backend.forward(x, [layer]), units)
    (g,) = torch.autograd.grad(obj.sum(), x)
    norm2 = g.double().flatten(1).pow(2).sum(1)
    # a unit whose gradient is zero at the start (a zero-initialized head, a dead unit) says
    # nothing about the scale: only the units that respond are measured
    ok = torch.isfinite(norm2) & (norm2 > 0)
    if not ok.any():
        raise NoResponse(f"no unit of {layer} has a gradient at the start image")
    return float((2.0 / norm2[ok]).median() / 100.0)


class NoResponse(DeepvisError):
    """The calibration's units have no gradient at the start image."""
