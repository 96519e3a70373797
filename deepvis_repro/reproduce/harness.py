"""The reproduction harness: every (setting, unit) of a profile, compared with stored references
and measured. Writes PNGs, a labelled grid, metrics.json and report.html into one folder; an
interruption still leaves a valid report of what was done."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DeepvisError
from ..files import signals_deferred, write_json
from ..images import figure_grid, save_png, stretched
from ..numerics import Numerics
from ..optimize import get_preset, optimize
from ..outputs import unit_label
from ..progress import progress as progress_bar
from ..references import replace_folder
from ..units import layer_shapes, parse_unit, shown_layers
from ..validate import number, whole
from .compare import DEFAULT_MIN_SSIM, TRAJECTORY_STEPS, verdict
from .metrics import class_ranks, high_frequency_energy, total_variation
from .plots import write_plots
from .report import write_report
from .stats import claim, claim_line, per_setting


def default_reference_dir(backend_name: str, profile: str) -> Path:
    """reference_outputs/<backend>/<profile> of the source tree (next to the package)."""
    here = Path(__file__).resolve().parents[2] / "reference_outputs"
    root = here if here.is_dir() else Path.cwd() / "reference_outputs"
    return root / backend_name.replace(":", "_") / profile


def profile_units(backend, profile) -> list[tuple[str, int | None]]:
    """(unit, class index or None) for the profile: its classes on the output layer (the last
    before 'prob'), then hidden units at fractions of the layer list. A class or channel the
    model does not have is one line, never dropped or wrapped around: the units run are the
    units named."""
    layers = [l for l in shown_layers(backend) if l != "prob"]
    out_layer = backend.output_layer
    units = []
    n_out = layer_shapes(backend, [out_layer])[out_layer][0]
    classes = _entries("profile.classes", profile.get("classes"))
    if classes and not backend.labels:
        raise DeepvisError(f"profile.classes needs a backend with labels; {backend.name} has none "
                           "(give profile.classes=[] and hidden units)")
    for c in classes:
        c = whole("profile.classes entry", c, 0)
        if c >= n_out:
            raise DeepvisError(f"profile.classes: class {c} out of range ({out_layer} has {n_out} classes, 0..{n_out - 1})")
        units.append((f"{out_layer}:{c}", c))
    for entry in _entries("profile.hidden", profile.get("hidden")):
        if not _is_list(entry) or len(entry) != 2:
            raise DeepvisError(f"profile.hidden entries are [depth fraction, channel], e.g. [0.5, 10]; got {entry!r}"[:300])
        frac = number("profile.hidden depth fraction", entry[0], minimum=0.0)
        if frac > 1:
            raise DeepvisError(f"profile.hidden depth fraction must be in [0, 1] (of the layer list), got {frac}")
        channel = whole("profile.hidden channel", entry[1], 0)
        layer = layers[min(len(layers) - 2, max(0, int(round(frac * (len(layers) - 1)))))]
        n = layer_shapes(backend, [layer])[layer][0]
        if channel >= n:
            raise DeepvisError(f"profile.hidden: channel {channel} out of range for {layer} (depth {frac:g}), "
                               f"which has {n} channels")
        units.append((f"{layer}:{channel}", None))
    if not units:
        raise DeepvisError("the profile names no units")
    return units


def _is_list(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _entries(what: str, value) -> list:
    if value is None:
        return []
    if not _is_list(value):
        raise DeepvisError(f"{what} must be a list, got {value!r}"[:300])
    return list(value)


def image_name(setting: str, unit: str) -> str:
    """The file an image is stored under, here and among the references: both parts are safe
    (a setting's name is checked; a unit's slug has no '/'), so no name can reach another folder."""
    return f"{setting}__{parse_unit(unit).slug}.png"


def expected_images(presets, units) -> set[str]:
    """The reference files a run of these settings and units writes."""
    return {image_name(p.name, u) for p in presets for u, _ in units}


@dataclass
class Run:
    records: list = field(default_factory=list)
    images: dict = field(default_factory=dict)  # (setting, unit) -> HxWx3 uint8
    interrupted: bool = False
    seconds: float = 0.0
    numerics: dict = field(default_factory=dict)


def check_profile(backend, profile) -> tuple[list, list]:
    """Every setting and unit of a profile, checked before any work: (presets, units)."""
    settings = profile.get("settings") or []
    if not settings:
        raise DeepvisError("the profile names no settings")
    presets = [get_preset(name, steps=profile.get("steps")) for name in settings]
    return presets, profile_units(backend, profile)


def run_profile(backend, profile, *, seed=0, judge=None, progress=True, numerics="portable") -> Run:
    """Every setting of the profile on its units. numerics="portable" (the default for the
    harness) gives the same images on any x86-64 CPU and thread count, so stored references
    compare bit for bit (deepvis_repro/numerics.py)."""
    presets, units = check_profile(backend, profile)
    run = Run()
    t0 = time.perf_counter()
    total = sum(p.steps for p in presets) * len(units)
    bar = progress_bar(total=total, desc=f"reproduce {profile.get('name', '')}", unit="unit-step",
                       enabled=progress)

    def step(_i, _n):
        bar.update(len(units))

    for preset in presets:
        name = preset.name
        bar.set_description(f"reproduce {profile.get('name', '')}: {name}")
        result = optimize(backend, [u for u, _ in units], preset=preset, seed=seed, progress=False,
                          on_step=step, numerics=numerics)
        run.numerics = result.numerics
        # the judge's ranks, too, the same on every machine; measured in float32 under bf16
        with Numerics("default" if numerics == "bf16" else numerics).active(backend.device):
            ranks = class_ranks(judge, result.images, [c for _, c in units[:len(result.units)]])
            own = class_ranks(backend, result.images, [c for _, c in units[:len(result.units)]])
        for i, (u, c) in enumerate(units[:len(result.units)]):
            img = result.images[i]
            run.images[(name, u)] = img
            run.records.append({
                "setting": name, "unit": u, "label": unit_label(backend, result.units[i]),
                "activation": float(result.best_activation[i]), "best_step": int(result.best_step[i]),
                "steps": preset.steps, "steps_run": int(len(result.history)),
                "partial": bool(result.interrupted), "total_variation": total_variation(img),
                "hf_energy": high_frequency_energy(img), "judge_rank": ranks[i], "own_rank": own[i],
                "stopped": result.stopped[i][0] if i in result.stopped else None,
                "image": f"images/{image_name(name, u)}",
                "ssim": None, "reference": "missing", "comparison": None,
                "history": [None if not np.isfinite(v) else float(v) for v in result.history[:, i]],
            })
        if result.interrupted:
            run.interrupted = True
            break
    bar.close()
    run.seconds = time.perf_counter() - t0
    return run


def write_references(run: Run, ref_dir: Path, manifest: dict) -> None:
    """The new set is written beside the old one and swapped in at once (references.py): a kill
    at any moment leaves the old set or the new one, never a mix."""
    def fill(folder: Path):
        for r in run.records:
            save_png(folder / Path(r["image"]).name, run.images[(r["setting"], r["unit"])])
        # the first objective values: what the rounding criterion compares where bits differ
        write_json(folder / "trajectories.json", trajectories(run.records))
        write_json(folder / "manifest.json", manifest)

    replace_folder(ref_dir, fill)
    for r in run.records:
        r["reference"], r["ssim"], r["comparison"] = "written", 1.0, None


def trajectories(records: list) -> dict:
    """{reference file name: {"steps": the setting's length, "history": its first objective values}}."""
    return {Path(r["image"]).name: {"steps": r["steps"], "history": (r.get("history") or [])[:2 * TRAJECTORY_STEPS]}
            for r in records}


def rewrite_metrics(out: Path, metrics: dict) -> None:
    """metrics.json and report.html again, after the records changed (references written)."""
    with signals_deferred():
        write_json(out / "metrics.json", metrics)
        write_report(out / "report.html", metrics, has_grid=bool(metrics["results"]))


def write_outputs(out: Path, backend, run: Run, info: dict, failures: list) -> dict:
    """Images, grid, metrics.json and report.html; signals arriving meanwhile wait until all is
    written (each file is also written whole, atomically)."""
    with signals_deferred():
        return _write_outputs(out, backend, run, info, failures)


def _write_outputs(out: Path, backend, run: Run, info: dict, failures: list) -> dict:
    (out / "images").mkdir(parents=True, exist_ok=True)
    for r in run.records:
        save_png(out / r["image"], run.images[(r["setting"], r["unit"])])
    settings = list(dict.fromkeys(r["setting"] for r in run.records))
    units = list(dict.fromkeys(r["unit"] for r in run.records))
    if run.records:
        rows = [[run.images.get((s, u)) for u in units] for s in settings]
        labels = {r["unit"]: r["label"] for r in run.records}
        cols = [f"{u} {labels[u] or ''}".strip() for u in units]
        save_png(out / "grid.png", figure_grid(rows, row_labels=settings, col_labels=cols, tile=160))
        # The same images contrast-stretched around grey (the original's 'without mean' view):
        # faint images show what structure they hold.
        save_png(out / "grid_stretched.png", figure_grid([[None if im is None else stretched(im) for im in row]
                                                          for row in rows], row_labels=settings, col_labels=cols, tile=160))
    seed = int(info.get("seed", 0))
    claim_tests = claim(run.records, seed=seed)
    metrics = {**info, "interrupted": run.interrupted, "seconds": run.seconds, "numerics": run.numerics,
               "verdict": verdict(run.records, float(info.get("min_ssim", DEFAULT_MIN_SSIM))),
               "summary": summarize(run.records, seed), "claim": claim_tests, "claim_line": claim_line(claim_tests),
               "failures": [f"{r['setting']} {r['unit']}" for r in failures],
               "partial_settings": sorted({r["setting"] for r in run.records if r.get("partial")}),
               "results": run.records}
    plots = write_plots(out, metrics) if run.records else []
    metrics["plots"] = plots
    write_json(out / "metrics.json", metrics)
    write_report(out / "report.html", metrics, has_grid=bool(run.records))
    return metrics


def summarize(records: list, seed: int = 0) -> list[dict]:
    """Per setting: each measure with its bootstrap interval over units (stats.per_setting), and
    the plain figures the console prints."""
    intervals = per_setting(records, seed)
    out = []
    for s, ci in intervals.items():
        rs = [r for r in records if r["setting"] == s]
        ranks = [r["judge_rank"] for r in rs if r["judge_rank"] is not None]
        out.append({
            "setting": s, "units": len(rs),
            "mean_activation": ci["activation"]["estimate"] if ci["activation"] else None,
            "mean_total_variation": ci["total_variation"]["estimate"] if ci["total_variation"] else None,
            "mean_hf_energy": ci["hf_energy"]["estimate"] if ci["hf_energy"] else None,
            "median_judge_rank": float(np.median(ranks)) if ranks else None,
            "judge_top5": int(sum(r <= 5 for r in ranks)) if ranks else None,
            "class_units": len(ranks), "intervals": ci,
        })
    return out


