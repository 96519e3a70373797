"""Every unit's optimized image, into the atlas: ``regularized_opt/<layer>/<layer>_%04d.jpg``.

One image per unit, made with one setting (paper_3 by default, the setting that made most of the
paper's images): the best image of the run, cut to the unit's receptive field for conv units (the
only pixels the unit sees; the rest is the start noise) and whole for fc units. The original's
montage of several runs per unit cost 4x the compute for pictures that mostly agree; one image
per unit keeps fc's 1,000 units a short job and the pane readable. ``results.json`` beside the
images records the setting and, per unit, the activation reached and the step it was reached at;
``whole_layer.jpg`` is every unit's image in one square sprite (pattern mode, and old tools).

Resumable: units whose image exists are skipped, so a rerun of the same command continues; a rerun
with another setting or another model into the same folder is refused.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict

import numpy as np

from ..errors import DeepvisError
from ..files import image_file_ok, signals_deferred, write_json
from ..images import save_image
from ..numerics import Numerics
from ..optimize import backend_lr_scale, get_preset, optimize
from ..optvis.convergence import Convergence, criterion_words
from ..optvis.preactivation import layer_clamp
from ..progress import progress as progress_bar
from ..units import Unit, expand_units, layer_shapes, parse_unit
from .mining import make_engine
from .patches import display_box
from .receptive import crop_box, layer_geometry
from .store import AtlasStore, layer_slug


SPRITE_TILE = 64
#: in the fast mode a batch (the atlas's unit of work, recomputed whole on a resume) holds this many
#: times batch_size units, run batch_size rows at a time: a unit that converges leaves its row to the
#: next unit (optimize._drive), and a longer batch keeps the rows full for longer before its last
#: units run alone (README, "The whole atlas in the fast mode": measured per layer)
FAST_BATCHES_PER_CHUNK = 8


def unit_image(backend, unit: Unit, image: np.ndarray) -> np.ndarray:
    """What the atlas keeps of an optimized image: the unit's field (conv), or all of it (fc)."""
    if unit.y is None:
        return image
    return crop_box(image, display_box(layer_geometry(backend, unit.layer), unit.y, unit.x, backend.input_size))


class LayerRecord:
    """regularized_opt/<layer>/results.json: the setting and per-unit results."""

    def __init__(self, store: AtlasStore, layer: str):
        self.path = os.path.join(store.root, "regularized_opt", layer_slug(layer), "results.json")
        self.data = {"layer": layer, "setting": None, "units": {}}
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.data = json.load(f)
            except (OSError, ValueError):
                pass  # rebuilt from what this run writes; the images themselves are intact

    def check_setting(self, setting: dict) -> None:
        old = self.data.get("setting")
        if old and old != setting:
            raise DeepvisError(
                f"{os.path.dirname(self.path)} holds images made with {_said(old)}; this run asks "
                f"{_said(setting)}: give another atlas.dir")
        self.data["setting"] = setting

    def add(self, channel: int, record: dict) -> None:
        self.data["units"][str(int(channel))] = record

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_json(self.path, self.data)


class OptimizeWorker:
    """Optimizes a batch of units (strings); built once per process or Ray actor."""

    def __init__(self, backend, preset, seed: int, lr_scale: float, progress_scale: float,
                 converge: Convergence | None = None, pre_activation: bool = False, numerics: str = "default",
                 width: int | None = None):
        self.backend, self.preset, self.seed, self.width = backend, preset, int(seed), width
        self.lr_scale, self.progress_scale, self.converge = lr_scale, progress_scale, converge
        self.pre_activation, self.numerics = bool(pre_activation), str(numerics)

    def __call__(self, units: list[str]) -> dict:
        r = optimize(self.backend, units, preset=self.preset, seed=self.seed, progress=False, batch_size=self.width,
                     lr_scale=self.lr_scale, progress_scale=self.progress_scale, converge=self.converge,
                     pre_activation=self.pre_activation, numerics=self.numerics)
        return {"images": r.images, "best_activation": r.best_activation, "best_step": r.best_step,
                "stopped": {int(k): v for k, v in r.stopped.items()}, "interrupted": r.interrupted,
                "converged": {int(k): int(v) for k, v in r.converged.items()},
                "units": [str(u) for u in r.units]}


def _said(setting: dict) -> str:
    c = (setting.get("fast") or {}).get("convergence")
    # the criterion said: two atlases' fast modes may differ in it alone
    mode = f"fast mode: {criterion_words(c)}" if c else "fast mode" if setting.get("fast") else "exact mode"
    pre = f", optimized before {setting['pre_activation']}" if setting.get("pre_activation") else ""
    num = f", numerics {setting['numerics']}" if setting.get("numerics") else ""
    return f"{setting.get('name')} ({setting.get('steps')} steps, seed {setting.get('seed')}, {mode}{pre}{num})"


def write_unit(backend, store: AtlasStore, unit: Unit, image: np.ndarray) -> str:
    path = store.unit_file("regularized_opt", unit.layer, unit.channel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_image(path, unit_image(backend, unit, image), quality=95)
    return path


def write_sprite(store: AtlasStore, layer: str, channels: int, tile: int = SPRITE_TILE) -> str | None:
    """whole_layer.jpg: every unit's image in a near-square grid (a black tile where missing)."""
    from PIL import Image

    cols = max(1, math.ceil(math.sqrt(channels)))
    rows = math.ceil(channels / cols)
    sprite = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    found = 0
    for c in range(channels):
        p = store.unit_file("regularized_opt", layer, c)
        if os.path.isfile(p):
            r, q = divmod(c, cols)
            try:
                with Image.open(p) as im:
                    sprite[r * tile:(r + 1) * tile, q * tile:(q + 1) * tile] = np.asarray(
                        im.convert("RGB").resize((tile, tile), Image.BILINEAR))
            except (OSError, ValueError):  # a damaged picture: a black tile (the next run redoes it)
                continue
            found += 1
    if not found:
        return None
    path = store.whole_layer(layer)
    save_image(path, sprite, quality=90)
    return path


def optimize_into_atlas(backend, atlas_dir, units, preset="paper_3", steps: int | None = None, seed: int = 0,
                        batch_size: int = 8, engine="local", progress: bool = True,
                        engine_options: dict | None = None, lr_scale: float | None = None,
                        fast: bool | Convergence = False, pre_activation: bool = False,
                        numerics: str = "default") -> dict:
    """Optimize every given unit ('layer:all' for a whole layer) that the atlas lacks, in batches,
    and write its image. Returns {"written": n, "skipped": n already there, "interrupted": bool,
    "units": n asked, "numerics": what the images were made in}.
    fast: stop each unit once its objective has converged (optvis/convergence.py; True: the
    default criterion, or a Convergence) instead of running the setting's full length; recorded
    in results.json, and an atlas made in one mode (or criterion) refuses another.
    pre_activation: a layer ending in a clamp (ReLU6: stem, head, pool) is optimized before it
    (optvis/preactivation.py); recorded for those layers only (the others' images are the same).
    numerics: "default", "bf16" or "portable" (deepvis_repro/numerics.py); recorded unless default,
    so an atlas refuses to mix float32 and bfloat16 images in a layer.
    One writer at a time (AtlasStore.writer)."""
    with AtlasStore(atlas_dir).writer():
        return _optimize_into_atlas(backend, atlas_dir, units, preset, steps, seed, batch_size, engine, progress,
                                    engine_options, lr_scale, fast, pre_activation, numerics)


def _optimize_into_atlas(backend, atlas_dir, units, preset, steps, seed, batch_size, engine, progress,
                         engine_options, lr_scale=None, fast=False, pre_activation=False,
                         numerics="default") -> dict:
    p = get_preset(preset, steps=steps)
    converge = fast if isinstance(fast, Convergence) else Convergence() if fast else None
    units = expand_units(backend, units)
    if int(batch_size) < 1:
        raise DeepvisError(f"batch_size must be at least 1, got {batch_size}")
    eng = make_engine(engine, **(engine_options or {}))
    store = AtlasStore(atlas_dir)
    os.makedirs(store.root, exist_ok=True)
    store.check_model(backend)
    setting = {**asdict(p), "seed": int(seed)}
    if converge is not None:  # absent in exact mode: the atlases of earlier releases stay valid
        setting["fast"] = {"convergence": converge.describe()}
    # what the images are made in: bf16 asked where it would only be emulated runs float32 (the
    # optimizer says so once) and is recorded as float32
    numerics = Numerics(str(numerics)).runs_as(backend.device)
    if numerics != "default":  # likewise absent for float32, as every earlier atlas was made
        setting["numerics"] = numerics
    records = {}
    for layer in dict.fromkeys(u.layer for u in units):
        records[layer] = LayerRecord(store, layer)
        clamp = layer_clamp(backend, layer) if pre_activation else None
        # absent where nothing is taken off: those layers' images are the paper's either way
        records[layer].check_setting({**setting, "pre_activation": clamp} if clamp else setting)
    def done(u: Unit) -> bool:
        """Image and record both on the disk (a death between the two leaves the unit to do
        again), and not a short on-demand image from the live view."""
        return image_file_ok(store.unit_file("regularized_opt", u.layer, u.channel)) and \
            str(u.channel) in records[u.layer].data.get("units", {}) and \
            str(u.channel) not in records[u.layer].data.get("on_demand", {})

    # Batches are fixed by position within each layer, whatever is already done: a batch's images
    # depend on its composition (batched convolutions round differently), so a resumed run
    # recomputes whole batches and gives exactly the images of an uninterrupted run.
    by_layer: dict[str, list[Unit]] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)
    # In the fast mode a batch is FAST_BATCHES_PER_CHUNK times longer, run batch_size rows at a time.
    chunk = int(batch_size) * (FAST_BATCHES_PER_CHUNK if converge is not None else 1)
    batches = [[str(u) for u in us[i:i + chunk]] for us in by_layer.values()
               for i in range(0, len(us), chunk)
               if not all(done(u) for u in us[i:i + chunk])]
    todo = [u for b in batches for u in b]
    lr_scale = backend_lr_scale(backend) if lr_scale is None else float(lr_scale)
    make_worker = functools.partial(OptimizeWorker, backend, p, seed, lr_scale,
                                    float(getattr(backend, "progress_scale", 1.0)), converge, pre_activation,
                                    numerics, int(batch_size))
    bar = progress_bar(total=len(units), initial=len(units) - len(todo),
                       desc=f"optimize {p.name}, {'converged or ' if converge else ''}{p.steps} steps", unit="unit",
                       enabled=progress)
    written, interrupted = 0, False
    try:
        for batch, res in eng.map(make_worker, batches):
            if res["interrupted"]:  # Ctrl-C inside the batch: its images are unfinished
                raise KeyboardInterrupt
            with signals_deferred():
                for i, spec in enumerate(res["units"]):
                    u = parse_unit(spec)
                    write_unit(backend, store, u, res["images"][i])
                    records[u.layer].data.get("on_demand", {}).pop(str(u.channel), None)
                    stop = res["stopped"].get(i)
                    records[u.layer].add(u.channel, {
                        "unit": spec, "best_activation": float(res["best_activation"][i]),
                        "best_step": int(res["best_step"][i]), "converged_at": res["converged"].get(i),
                        "stopped": None if stop is None else {"step": stop[0], "reason": stop[1]}})
                records[parse_unit(res["units"][0]).layer].save()
                written += len(batch)  # counted inside: a signal held until here must not lose it
            bar.update(len(batch))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if not interrupted:
        for layer in records:
            write_sprite(store, layer, layer_shapes(backend, [layer])[layer][0])
    return {"written": written, "skipped": len(units) - len(todo), "interrupted": interrupted,
            "units": len(units), "numerics": numerics}
