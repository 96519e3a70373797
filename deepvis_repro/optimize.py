"""Regularized optimization in image space: the loop that joins the optimizer's parts
(deepvis_repro/optvis/): an objective (each unit's value, units.gather_units), an image
parametrization (the paper's pixels, Lucid's Fourier basis, MACO's phase), robustness transforms
and a step rule (the paper's lr policies and regularizers, or Adam). With the paper's settings it is
an exact, batched port of the original toolbox's gradient optimizer (Yosinski et al. 2015;
../shared/PAPER.md states the rule).

Everything runs in the backend contract's space: mean-subtracted RGB pixels on a 0..255 scale.
All units run as one batch; each image's regularization (percentiles included) is its own, so a
batch of N gives the images of N single runs.
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


def _run_batch(backend, units, p: Preset, x, seed, bar, lr_scale, progress_scale, on_step=None,
               on_best=None, converge: Convergence | None = None) -> _Batch:
    n = len(units)
    layers = value_layers(backend, units)
    param = make_param(backend, p, x, seed)
    rule = make_rule(p, param, lr_scale, progress_scale)
    robust = Robustness(p, backend.input_size, seed)
    k = robust.copies
    best_x = x.clone()
    best = torch.full((n,), -math.inf, device=x.device, dtype=torch.float64)
    best_step = torch.full((n,), -1, dtype=torch.long)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    # MACO's transparency map: where the objective's gradient in image space was large, summed over steps
    attribution = torch.zeros(n, *backend.input_size, device=x.device) if p.param == "maco" else None
    # The per-step records, one row a step, written in place: a small tensor kept from every step
    # pins the allocator's heap between the step's large blocks, and a run's peak memory grew with
    # its steps (blocks.2's 24 units, bf16, 200 steps: 1.9 GB with lists of tensors, 1.3 GB so)
    history = np.full((p.steps, n), np.nan)
    argmax = np.full((p.steps, n), -1, dtype=np.int64)
    recorded = [0, 0]  # rows of history and argmax written
    # the best value after each step, for the convergence stop's look back
    trace = torch.empty((p.steps, n), dtype=torch.float64, device=x.device) if converge is not None else None
    stopped, converged = {}, {}
    rows = list(range(n))  # the batch rows the network sees (under a convergence stop: the active ones)
    interrupted = False
    try:
        for ii in range(p.steps):
            if on_step is not None:
                on_step(ii, p.steps)  # may wait (a paused background job) or raise to cancel
            # 1. the image (pixels: x kept valid), and the copies the network sees
            x = param.image()
            # 2. forward only as deep as the deepest unit; the objective is each unit's value
            #    (the mean over the transformed copies). Under a convergence stop, only the rows
            #    still running go through the network (a converged unit costs nothing more).
            sub = rows if len(rows) < n else None
            xs = x if sub is None else x[sub]
            acts = backend.forward(robust(xs), layers)
            us = units if sub is None else [units[i] for i in sub]
            obj = gather_units(acts, us * k, backend).float()  # bf16 numerics: statistics in float32
            if k > 1:
                obj = obj.view(k, len(us)).mean(0)
            if sub is not None:
                obj = torch.full((n,), torch.nan, device=obj.device, dtype=obj.dtype).index_put(
                    (torch.as_tensor(sub, device=obj.device),), obj)
                seen = {i: m for m, i in enumerate(sub)}
            # 3. d obj / d leaf: each image's objective depends on that image only
            wrt = [param.leaf] + ([x] if attribution is not None else [])
            grads = torch.autograd.grad(obj, wrt, torch.ones_like(obj))  # no reduction: same bits anywhere
            g = grads[0]
            x, obj = x.detach(), obj.detach()
            with torch.no_grad():
                argmax[ii] = _argmax_channels(acts, units, None if sub is None else seen).cpu().numpy()
                recorded[1] = ii + 1
                finite = torch.isfinite(obj) & torch.isfinite(g).flatten(1).all(1)
                for i in torch.nonzero(active & ~finite).flatten().tolist():
                    stopped[i] = (ii, "NaN or inf in the objective or gradient")
                zero = (g.flatten(1) == 0).all(1)
                for i in torch.nonzero(active & finite & zero).flatten().tolist():
                    stopped[i] = (ii, "gradient is exactly zero")
                objd = obj.double()
                # under random transforms each step's objective is a noisy estimate: the image kept
                # is the latest one, as Lucid and MACO return (the best draw would be a lucky one)
                improved = active & finite & ((objd > best) | robust.random)
                best = torch.where(improved, objd, best)
                best_x[improved] = x[improved]
                best_step[improved.cpu()] = ii
                history[ii] = torch.where(active & finite, objd, torch.nan).cpu().numpy()
                recorded[0] = ii + 1
                if attribution is not None:
                    attribution += torch.where(active.view(-1, 1, 1), torch.nan_to_num(grads[-1]).abs().sum(1), 0.0)
                active = active & finite & ~zero
                if converge is not None:
                    trace[ii] = best
                    if converge.due(ii + 1) and ii >= converge.window:
                        done = active & converge.converged(best, trace[ii - converge.window])
                        for i in torch.nonzero(done).flatten().tolist():
                            converged[i] = ii
                        active = active & ~done
                    rows = torch.nonzero(active).flatten().tolist()  # stopped units leave the batch too
                if not bool(active.any()):
                    # every unit has stopped: the rest of the history is NaN (argmax -1), as for any
                    # stopped unit; the buffers hold that already
                    recorded[:] = [p.steps, p.steps]
                    bar.update((p.steps - ii) * n)
                    break
            # 4.-5. step (and the paper's regularizers), except on the last iteration
            if ii < p.steps - 1:
                rule.update(param, g, obj, active, ii)
            bar.update(n)
            if on_best is not None:
                on_best(ii, best_x, best)  # may raise to stop (a search's early stopping)
    except KeyboardInterrupt:
        interrupted = True
        # A signal between a step's two records leaves one a row longer: a step's record is whole
        # or absent (best_x / best are updated together, after both records' values exist), below.
    if robust.random:
        try:
            best = _plain_activation(backend, units, layers, best_x, best)
        except KeyboardInterrupt:  # a second Ctrl-C: the objective's values stand in
            interrupted = True
    return _Batch(best_x, best.cpu().numpy(), best_step.numpy(),
                  history[:min(recorded)], argmax[:min(recorded)],
                  stopped, interrupted, None if attribution is None else attribution.cpu().numpy(), converged)


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
    batch_size: units per batch (all at once by default; halved automatically on CUDA OOM).
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
            stop = min(n, start + size)
            if pre_activation:  # a clamp taken off for one layer would change a deeper layer's values
                stop = next((i for i in range(start + 1, stop) if units[i].layer != units[start].layer), stop)
            chunk = slice(start, stop)
            try:
                with mode.active(backend.device), (unclamped(backend, [units[start].layer]) if pre_activation
                                                   else contextlib.nullcontext()):
                    batch = _run_batch(backend, units[chunk], p, x0[chunk].clone(), seed, bar, lr_scale,
                                       progress_scale, on_step, on_best, converge)
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                size = max(1, size // 2)
                torch.cuda.empty_cache()
                continue
            parts.append((chunk, batch))
            start = chunk.stop
            if batch.interrupted:
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
