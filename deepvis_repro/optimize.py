"""Regularized optimization in image space: an exact, batched port of the original toolbox's
gradient optimizer (Yosinski et al. 2015; ../shared/PAPER.md states the rule).

Everything runs in the backend contract's space: mean-subtracted RGB pixels on a 0..255 scale.
All units run as one batch; each image's regularization (percentiles included) is its own, so a
batch of N gives the images of N single runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from .errors import DeepvisError
from .numerics import Numerics, tree_sum
from .units import Unit, gather_units, resolve_units

# ----- the four regularizers ------------------------------------------------------------------


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of scipy.ndimage's 'reflect' mode (d c b a | a b c d | d c b a), any radius."""
    i = np.arange(-radius, n + radius)
    j = np.mod(i, 2 * n)
    j = np.where(j >= n, 2 * n - 1 - j, j)
    return torch.as_tensor(j, device=device)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's kernel: radius int(truncate * sigma + 0.5)."""
    radius = int(truncate * float(sigma) + 0.5)
    xs = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * xs ** 2)
    return phi / phi.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Blur each channel of (N,C,H,W) like scipy.ndimage.gaussian_filter(channel, sigma):
    separable, 'reflect' borders, truncated at 4 sigma; on x's device, batched."""
    k = torch.as_tensor(gaussian_kernel1d(sigma, truncate), dtype=x.dtype, device=x.device)
    r = (k.numel() - 1) // 2
    if r == 0:
        return x
    n, c, h, w = x.shape
    flat = x.reshape(n * c, 1, h, w)
    flat = flat.index_select(2, _reflect_index(h, r, x.device))
    flat = F.conv2d(flat, k.view(1, 1, -1, 1))
    flat = flat.index_select(3, _reflect_index(w, r, x.device))
    flat = F.conv2d(flat, k.view(1, 1, 1, -1))
    return flat.reshape(n, c, h, w)


def percentile(score: torch.Tensor, pct: float) -> torch.Tensor:
    """Per row of (N, M), numpy's default percentile (linear interpolation, numpy's own lerp
    formula), in float64 from sorted values and single-rounding operations only, so that it has
    the same bits on every CPU (torch.quantile's fused lerp may not)."""
    v = torch.sort(score.double(), dim=1).values
    pos = (v.shape[1] - 1) * (float(pct) / 100.0)
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.shape[1] - 1)
    t = pos - lo
    a, b = v[:, lo], v[:, hi]
    d = b - a
    return b - d * (1.0 - t) if t >= 0.5 else a + d * t


def _zero_below_percentile(x: torch.Tensor, score: torch.Tensor, pct: float) -> torch.Tensor:
    """Zero the pixels of each image whose score (N,H,W) is strictly below that image's pct-th
    percentile (numpy's default linear interpolation)."""
    thr = percentile(score.flatten(1), pct)
    small = score.double() < thr.view(-1, 1, 1)
    return x.masked_fill(small.unsqueeze(1), 0.0)


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) -> (N,H,W): channels added in order, one rounding each (the same bits on every
    CPU, where a vectorized reduction's order may differ)."""
    return (t[:, 0] + t[:, 1]) + t[:, 2]


def check_regularization(*, decay=0.0, blur_radius=0.0, blur_every=0, small_norm_pct=0.0,
                         small_contrib_pct=0.0, **_):
    for name, v in (("small_norm_pct", small_norm_pct), ("small_contrib_pct", small_contrib_pct)):
        if not 0.0 <= float(v) <= 100.0:
            raise DeepvisError(f"{name} must be a percentile in [0, 100], got {v}")
    if not 0.0 <= float(decay) <= 1.0:
        raise DeepvisError(f"decay must be in [0, 1] (x *= 1 - decay), got {decay}")
    if float(blur_radius) < 0 or int(blur_every) < 0:
        raise DeepvisError(f"blur_radius and blur_every must be >= 0, got {blur_radius}, {blur_every}")


def regularize(x: torch.Tensor, grad: torch.Tensor, *, decay: float = 0.0, blur_radius: float = 0.0,
               blur_every: int = 0, small_norm_pct: float = 0.0, small_contrib_pct: float = 0.0,
               step: int = 0) -> torch.Tensor:
    """The paper's four regularizers on a batch (N,3,H,W), in the original's order: L2 decay,
    Gaussian blur (every blur_every steps), clipping small-norm pixels, clipping pixels of small
    contribution |sum_c grad * (-x)|. Returns the new x."""
    check_regularization(decay=decay, blur_radius=blur_radius, blur_every=blur_every,
                         small_norm_pct=small_norm_pct, small_contrib_pct=small_contrib_pct)
    if decay:
        x = x * (1.0 - decay)
    if blur_radius > 0 and blur_every > 0 and step % blur_every == 0:
        x = gaussian_blur(x, blur_radius)
    if small_norm_pct > 0:
        x = _zero_below_percentile(x, _channel_sum(x * x).sqrt(), small_norm_pct)
    if small_contrib_pct > 0:
        x = _zero_below_percentile(x, _channel_sum(grad * -x).abs(), small_contrib_pct)
    return x


# ----- presets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """One hyperparameter setting: regularization, learning-rate policy, length, start."""
    name: str = "custom"
    decay: float = 0.0
    blur_radius: float = 0.0
    blur_every: int = 0
    small_norm_pct: float = 0.0
    small_contrib_pct: float = 0.0
    lr_policy: str = "constant"  # constant | progress | progress01
    lr: float = 100.0
    max_lr: float = 100.0
    desired_prog: float = 2.0
    early_prog: float = 0.03
    late_prog_mult: float = 0.1
    steps: int = 1000
    start: str = "mean_plus_rand"  # mean_plus_rand | mean | randu

    def regularization(self) -> dict:
        return {k: getattr(self, k) for k in
                ("decay", "blur_radius", "blur_every", "small_norm_pct", "small_contrib_pct")}

    def validate(self) -> "Preset":
        """A copy with every field checked and converted (a typed 'abc' or 2.5 steps is a
        DeepvisError naming the field), or the error."""
        from .validate import number, whole

        numeric = {k: number(k, getattr(self, k)) for k in (
            "decay", "blur_radius", "small_norm_pct", "small_contrib_pct", "lr", "max_lr", "desired_prog",
            "early_prog", "late_prog_mult")}
        p = replace(self, **numeric, blur_every=whole("blur_every", self.blur_every, 0),
                    steps=whole("steps", self.steps, 1))
        check_regularization(**p.regularization())
        if p.lr_policy not in ("constant", "progress", "progress01"):
            raise DeepvisError(f"lr_policy must be constant, progress or progress01, got '{p.lr_policy}'")
        if p.start not in ("mean_plus_rand", "mean", "randu"):
            raise DeepvisError(f"start must be mean_plus_rand, mean or randu, got '{p.start}'")
        for k in ("lr", "max_lr", "desired_prog"):
            if getattr(p, k) <= 0:
                raise DeepvisError(f"{k} must be a positive number, got {getattr(p, k)}")
        return p


def _load_presets() -> dict[str, Preset]:
    folder = resources.files("deepvis_repro_conf").joinpath("regularization")
    out = {}
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.endswith(".yaml") and not p.name.startswith("_"):  # _file.yaml: regularization=FILE
            d = OmegaConf.to_container(OmegaConf.create(p.read_text()))
            out[d["name"]] = Preset(**d)
    return out


#: paper_1 .. paper_4 (Table 1) and none (plain gradient ascent), from conf/regularization/.
PRESETS: dict[str, Preset] = _load_presets()


def preset_from_file(path: str) -> Preset:
    """A setting written as a yaml file (the fields of Preset; a search's best_N.yaml), so that a
    profile can run it beside the paper's: 'profile.settings=[paper_3,my/best_1.yaml]'."""
    import os

    if not os.path.isfile(path):
        raise DeepvisError(f"setting file not found: {path}")
    try:
        d = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # yaml syntax: one line naming the file
        raise DeepvisError(f"cannot read setting file {path}: {str(e).splitlines()[0][:200]}") from None
    fields = set(Preset.__dataclass_fields__)
    if not isinstance(d, dict) or set(d) - fields - {"_target_", "provenance"}:
        bad = sorted(set(d) - fields) if isinstance(d, dict) else []
        raise DeepvisError(f"setting file {path} must hold Preset fields"
                           + (f"; unknown: {', '.join(bad)}" if bad else "") + f" (valid: {', '.join(sorted(fields))})")
    d = {k: v for k, v in d.items() if k in fields}
    d.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return Preset(**d)


def get_preset(preset, **overrides) -> Preset:
    if isinstance(preset, Preset):
        p = preset
    elif isinstance(preset, dict) and set(preset) == {"file"}:  # regularization=FILE on the command line
        p = preset_from_file(str(preset["file"]))
    elif isinstance(preset, dict):
        p = Preset(**preset)
    elif preset in PRESETS:
        p = PRESETS[preset]
    elif isinstance(preset, str) and preset.endswith((".yaml", ".yml")):
        p = preset_from_file(preset)
    else:
        raise DeepvisError(f"unknown preset '{preset}'; valid: {', '.join(PRESETS)}, or a .yaml file of one")
    fields = set(Preset.__dataclass_fields__)
    bad = set(overrides) - fields
    if bad:
        raise DeepvisError(f"unknown optimizer option(s) {', '.join(sorted(bad))}; valid: {', '.join(sorted(fields))}")
    return replace(p, **{k: v for k, v in overrides.items() if v is not None}).validate()


# ----- the optimizer ----------------------------------------------------------------------------


@dataclass
class OptimizationResult:
    units: list[Unit]
    preset: Preset
    images: np.ndarray              # (N,H,W,3) uint8: best image per unit, mean added
    x: torch.Tensor                 # (N,3,H,W) best x per unit (mean-subtracted, 0..255 scale)
    best_activation: np.ndarray     # (N,)
    best_step: np.ndarray           # (N,)
    history: np.ndarray             # (steps_run, N): objective per step, NaN once stopped
    argmax: np.ndarray              # (steps_run, N): argmax channel of the unit's layer per step
    stopped: dict = field(default_factory=dict)  # unit index -> (step, reason)
    interrupted: bool = False
    lr_scale: float = 1.0
    progress_scale: float = 1.0
    numerics: dict = field(default_factory=lambda: {"mode": "default", "native_reductions": None})

    def images_without_mean(self) -> np.ndarray:
        """x itself, centred on grey and scaled to fill 0..255 (the original's 'no mean' image)."""
        from .images import stretch_around_grey

        x = self.x.detach().cpu().permute(0, 2, 3, 1).numpy()
        return np.stack([stretch_around_grey(im) for im in x]) if len(x) else x.astype(np.uint8)


def start_images(backend, n: int, start: str, seed: int) -> torch.Tensor:
    """The starting x of each of n units: the same draw for each, as n single runs would get.
    The draw is numpy's legacy RandomState stream, which numpy keeps fixed across versions and
    machines (torch's randn vectorizes its transcendentals, so its normals depend on the CPU)."""
    rs = np.random.RandomState(int(seed))
    h, w = backend.input_size
    mean = backend.mean_image().detach().cpu().float()
    if start == "mean_plus_rand":
        x0 = torch.from_numpy(rs.standard_normal((3, h, w)).astype(np.float32)) * 10.0
    elif start == "randu":
        x0 = torch.from_numpy(rs.random_sample((3, h, w)).astype(np.float32)) * 255.0 - mean
    else:
        x0 = torch.zeros(3, h, w)
    return x0.unsqueeze(0).repeat(n, 1, 1, 1).to(backend.device)


def _learning_rate(p: Preset, g: torch.Tensor, obj: torch.Tensor, lr_scale: float,
                   progress_scale: float = 1.0) -> torch.Tensor:
    """Per-image learning rate (N,) under the preset's policy."""
    if p.lr_policy == "constant":
        return torch.full_like(obj, p.lr * lr_scale)
    gd = g.double().flatten(1)
    gnorm2 = tree_sum(gd * gd, 1).clamp_min(1e-300)  # a fixed order: the same bits on every CPU
    if p.lr_policy == "progress":
        desired = torch.full_like(gnorm2, p.desired_prog * progress_scale)
    else:  # progress01, for units in 0..1 such as softmax outputs
        desired = torch.minimum(torch.full_like(gnorm2, p.early_prog * progress_scale),
                                p.late_prog_mult * progress_scale * (1 - obj.double()))
    return torch.minimum(desired / gnorm2, torch.full_like(gnorm2, p.max_lr * lr_scale)).to(obj.dtype)


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


def _run_batch(backend, units, p: Preset, x, bar, lr_scale, progress_scale, on_step=None,
               on_best=None) -> _Batch:
    n = len(units)
    layers = sorted({u.layer for u in units}, key=backend.layers.index)
    mean = backend.mean_image().to(x.device)
    best_x = x.clone()
    best = torch.full((n,), -math.inf, device=x.device, dtype=torch.float64)
    best_step = torch.full((n,), -1, dtype=torch.long)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    history, argmax, stopped = [], [], {}
    interrupted = False
    try:
        for ii in range(p.steps):
            if on_step is not None:
                on_step(ii, p.steps)  # may wait (a paused background job) or raise to cancel
            # 1. keep x + mean a valid image
            x = (torch.clamp(x + mean, 0.0, 255.0) - mean).detach().requires_grad_(True)
            # 2. forward only as deep as the deepest unit; the objective is each unit's value
            acts = backend.forward(x, layers)
            obj = gather_units(acts, units)
            # 3. d obj / d x: each image's objective depends on that image only
            (g,) = torch.autograd.grad(obj, x, torch.ones_like(obj))  # no reduction: same bits anywhere
            x, obj = x.detach(), obj.detach()
            with torch.no_grad():
                argmax.append(torch.stack([
                    acts[u.layer][i].flatten(1)[:, 0 if u.y is None else u.y * acts[u.layer].shape[-1] + u.x].argmax()
                    if acts[u.layer].dim() == 4 else acts[u.layer][i].argmax()
                    for i, u in enumerate(units)]).cpu())
                finite = torch.isfinite(obj) & torch.isfinite(g).flatten(1).all(1)
                for i in torch.nonzero(active & ~finite).flatten().tolist():
                    stopped[i] = (ii, "NaN or inf in the objective or gradient")
                zero = (g.flatten(1) == 0).all(1)
                for i in torch.nonzero(active & finite & zero).flatten().tolist():
                    stopped[i] = (ii, "gradient is exactly zero")
                objd = obj.double()
                improved = active & finite & (objd > best)
                best = torch.where(improved, objd, best)
                best_x[improved] = x[improved]
                best_step[improved.cpu()] = ii
                history.append(torch.where(active & finite, objd, torch.nan).cpu())
                active = active & finite & ~zero
                if not bool(active.any()):
                    # every unit has stopped: the rest of the history is NaN, as for any stopped unit
                    history += [torch.full((n,), torch.nan, dtype=torch.float64)] * (p.steps - ii - 1)
                    argmax += [torch.full((n,), -1, dtype=torch.long)] * (p.steps - ii - 1)
                    bar.update((p.steps - ii) * n)
                    break
                # 4.-5. step and regularize, except on the last iteration
                if ii < p.steps - 1:
                    lr = _learning_rate(p, g, obj, lr_scale, progress_scale)
                    g = torch.nan_to_num(g)
                    new = x + lr.view(-1, 1, 1, 1) * g
                    new = regularize(new, g, step=ii, **p.regularization())
                    x = torch.where(active.view(-1, 1, 1, 1), new, x)
            bar.update(n)
            if on_best is not None:
                on_best(ii, best_x, best)  # may raise to stop (a search's early stopping)
    except KeyboardInterrupt:
        interrupted = True
        # A signal between a step's two records leaves one list a step longer: a step's record is
        # whole or absent (best_x / best are updated together, after both records' values exist).
        del history[min(len(history), len(argmax)):], argmax[min(len(history), len(argmax)):]
    return _Batch(best_x, best.cpu().numpy(), best_step.numpy(),
                  torch.stack(history).numpy() if history else np.zeros((0, n)),
                  torch.stack(argmax).numpy() if argmax else np.zeros((0, n), dtype=np.int64),
                  stopped, interrupted)


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
             on_best=None, **overrides) -> OptimizationResult:
    """Find, for each unit, the image that maximizes it under a preset's regularization.

    units: "layer:channel" or "layer:channel:y:x" strings (conv units default to the centre).
    preset: a name in PRESETS, a Preset or a dict; keyword overrides change single fields.
    lr_scale: multiplies the preset's learning rates (lr, max_lr); default the backend's own.
    progress_scale: multiplies the progress policies' desired progress; default the backend's own.
    batch_size: units per batch (all at once by default; halved automatically on CUDA OOM).
    on_step: called as on_step(step, steps) before each step (it may sleep, or raise to stop).
    on_best: called as on_best(step, best_x, best_activation) after each step, with the batch's
    best x so far (a search scores the images on the way, to stop hopeless settings early).
    numerics: "default" (the fastest kernels) or "portable" (the same bits on any x86-64 CPU and
    thread count, about 1.5x the time: deepvis_repro/numerics.py).
    Ctrl-C stops early and returns the best images so far (result.interrupted is True).
    """
    from .progress import progress as progress_bar
    from .validate import number, whole

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
            chunk = slice(start, min(n, start + size))
            try:
                with mode.active():
                    batch = _run_batch(backend, units[chunk], p, x0[chunk].clone(), bar, lr_scale,
                                       progress_scale, on_step, on_best)
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
    return OptimizationResult(
        units=units, preset=p, images=backend.deprocess(best_x).reshape(len(units), *backend.input_size, 3),
        x=best_x, best_activation=np.concatenate([b.best for b in batches]) if batches else np.zeros(0),
        best_step=np.concatenate([b.best_step for b in batches]) if batches else np.zeros(0, int),
        history=np.concatenate([_pad_rows(b.history, steps_run, np.nan) for b in batches], axis=1)
        if batches else np.zeros((0, 0)),
        argmax=np.concatenate([_pad_rows(b.argmax, steps_run, -1) for b in batches], axis=1).astype(int)
        if batches else np.zeros((0, 0), int),
        stopped=stopped, interrupted=any(b.interrupted for b in batches), lr_scale=lr_scale,
        progress_scale=progress_scale, numerics=mode.report())


def calibrate_lr_scale(backend, layer: str = "fc", n_units: int = 32, seed: int = 0) -> float:
    """The lr_scale at which the paper's constant lr (100) equals the 'progress' policy's own
    step (desired_prog 2 / ||g||^2) at the start, median over n_units channels of ``layer``.

    The paper's settings pair a constant lr of 100 with progress policies capped at max_lr 100,
    i.e. on CaffeNet the two agree in scale; this carries that agreement to any backend."""
    from .units import layer_shapes

    channels = layer_shapes(backend, [layer])[layer][0]
    idx = torch.linspace(0, channels - 1, min(n_units, channels)).round().long().tolist()
    units = resolve_units(backend, [f"{layer}:{c}" for c in idx])
    x = start_images(backend, len(units), "mean_plus_rand", seed).requires_grad_(True)
    obj = gather_units(backend.forward(x, [layer]), units)
    (g,) = torch.autograd.grad(obj.sum(), x)
    natural_lr = 2.0 / g.double().flatten(1).pow(2).sum(1)
    return float(natural_lr.median() / 100.0)
