"""How an image is compared with its stored reference.

1. **identical**: the same pixels. Runs in portable numerics (deepvis_repro/numerics.py) give
   the same bits on any x86-64 CPU with FMA and any thread count, so this is the normal case.
2. **rounding criterion**, where bits cannot be equal (a GPU, another architecture, a scalar
   build, default numerics on another CPU): the image passes when it is a *rounding twin* of the
   reference, judged by its trajectory, not its pixels. Gradient ascent amplifies a last-bit
   difference into another image within tens of steps, so late images of twins are as far apart
   as those of a changed setting (measured: SSIM cannot separate them). But a twin starts on the
   same trajectory: its first ``TRAJECTORY_STEPS`` objective values agree with the reference's to
   within rounding, while a changed blur width, percentile or learning rate, another seed or
   another unit moves them far more from the first update on. (A tenfold decay of 1e-4 moves
   them less than rounding does: only the bit-exact comparison sees it.) The reference
   folder stores those values (trajectories.json); the tolerance is calibrated by
   benchmarks/calibrate_comparison.py (README: "How references are compared", with the margins).
   References without trajectories fall back to SSIM >= ``min_ssim``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..references import recover
from .metrics import ssim


#: The fallback for references without trajectories (SSIM alone; README says how weak it is).
DEFAULT_MIN_SSIM = 0.75
#: A reference image is a few hundred KB at most; a file past these bounds is refused as damaged
#: before it is decoded (a 20000x20000 PNG put in a reference's place).
MAX_REFERENCE_BYTES = 50 * 1024 * 1024
MAX_REFERENCE_PIXELS = 4096 * 4096
#: How many of the first objective values the trajectory criterion compares. Measured: after two
#: steps the ascent has amplified rounding up to 1000x a step, as far as a real change moves them.
TRAJECTORY_STEPS = 2
#: Largest relative difference of those values for one image, and for the median over a
#: setting's images, of a rounding twin (calibrated by benchmarks/calibrate_comparison.py: twins
#: reach 1.2e-2 for one image and 6.6e-4 for a median; planted changes 0.10 / 3.5e-2 and more).
DEFAULT_TRAJECTORY_TOLERANCE = 5e-2
DEFAULT_MEDIAN_TOLERANCE = 5e-3


def trajectory_difference(run_history, ref_history, steps: int = TRAJECTORY_STEPS) -> float:
    """Largest relative difference of the first objective values, |a - b| / max(|b|, 1) (inf when
    either is shorter or one is finite where the other is not)."""
    try:
        a = np.asarray([np.nan if v is None else v for v in list(run_history)[:steps]], dtype=np.float64)
        b = np.asarray([np.nan if v is None else v for v in list(ref_history)[:steps]], dtype=np.float64)
    except (TypeError, ValueError):  # a damaged trajectories.json (strings, lists): no twin
        return float("inf")
    if a.ndim != 1 or b.ndim != 1:
        return float("inf")
    n = min(steps, len(ref_history))
    if len(a) < n or len(b) < n or n == 0 or not np.array_equal(np.isfinite(a[:n]), np.isfinite(b[:n])):
        return float("inf")
    ok = np.isfinite(b[:n])
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(a[:n][ok] - b[:n][ok]) / np.maximum(np.abs(b[:n][ok]), 1.0)))


def load_trajectories(ref_dir: Path) -> dict:
    import json

    try:
        with open(ref_dir / "trajectories.json", encoding="utf-8") as f:
            t = json.load(f)
        return t if isinstance(t, dict) else {}
    except (OSError, ValueError):
        return {}


def compare(run, ref_dir: Path, min_ssim: float = DEFAULT_MIN_SSIM, bits_expected: bool = False,
            tolerance: float = DEFAULT_TRAJECTORY_TOLERANCE,
            median_tolerance: float = DEFAULT_MEDIAN_TOLERANCE) -> list[dict]:
    """Fill each record's reference status (match, differs, missing, damaged: an unreadable file),
    its ssim and how it was compared (identical, or the rounding criterion); return the failures
    (differs and damaged). bits_expected says whether the run and the references were both made
    in portable numerics, where any difference at all is worth a note."""
    recover(ref_dir)
    trajectories = load_trajectories(Path(ref_dir))
    failures = []
    for r in run.records:
        path = ref_dir / Path(r["image"]).name
        if r.get("partial") or (r.get("steps_run") is not None and r["steps_run"] < r.get("steps", 0)):
            # cut short by a signal: its first steps agree with the reference's, yet it is not the
            # image the reference is (never a rounding twin)
            r["reference"], r["ssim"], r["comparison"] = "partial", None, None
            failures.append(r)
            continue
        if not path.is_file():
            r["reference"], r["ssim"], r["comparison"] = "missing", None, None
            failures.append(r)
            continue
        try:
            if path.stat().st_size > MAX_REFERENCE_BYTES:
                raise ValueError(f"{path.stat().st_size:,} bytes, more than a reference image holds")
            with Image.open(path) as im:
                if im.width * im.height > MAX_REFERENCE_PIXELS:  # from the header: a decompression bomb
                    raise ValueError(f"{im.width}x{im.height} pixels, more than a reference image holds")
                ref = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            r["reference"], r["ssim"], r["comparison"] = "damaged", None, None
            r["reference_error"] = f"{path.name}: {e}"
            failures.append(r)
            continue
        img = run.images[(r["setting"], r["unit"])]
        if img.shape == ref.shape and np.array_equal(img, ref):
            r["reference"], r["ssim"], r["comparison"] = "match", 1.0, "identical"
            continue
        r["ssim"] = ssim(img, ref) if img.shape == ref.shape else 0.0
        r["bits_expected"] = bool(bits_expected)
        if bits_expected:
            # both in portable numerics: the same bits are the criterion, and one bit is a difference
            r["comparison"] = "identical expected"
            r["reference"] = "differs"
            failures.append(r)
            continue
        r["comparison"] = "rounding criterion"
        theirs = trajectories.get(path.name)
        if isinstance(theirs, dict) and isinstance(theirs.get("history"), list):
            r["trajectory_difference"] = trajectory_difference(r.get("history") or [], theirs["history"])
            ok = r["trajectory_difference"] <= tolerance and theirs.get("steps") in (None, r.get("steps"))
        else:  # an older reference set: SSIM alone
            ok = bool(np.isfinite(r["ssim"]) and r["ssim"] >= min_ssim)
        r["reference"] = "match" if ok else "differs"
        if not ok:
            failures.append(r)
    # One image's first steps can move far under rounding (percentile clipping flips pixels at the
    # first update), but a changed setting moves most of its images: the median of a setting's
    # differences must stay within rounding too.
    by_setting: dict[str, list] = {}
    for r in run.records:
        if r.get("trajectory_difference") is not None:
            by_setting.setdefault(r["setting"], []).append(r)
    for setting, rs in by_setting.items():
        med = float(np.median([r["trajectory_difference"] for r in rs]))
        if med > median_tolerance:
            for r in rs:
                r["setting_trajectory_median"] = med
                if r["reference"] == "match":
                    r["reference"] = "differs"
                    failures.append(r)
    return failures


def verdict(records: list, min_ssim: float) -> str | None:
    """'15/15 images match the references (15 identical)', or None when none was compared.
    Every image counts: one without a reference, or cut short, is one that did not match."""
    compared = [r for r in records if r["reference"] in ("match", "differs", "damaged", "missing", "partial")]
    if not compared:
        return None
    ok = sum(r["reference"] == "match" for r in compared)
    same = sum(r.get("comparison") == "identical" for r in compared)
    twins = ok - same
    how = [f"{same} identical"] if same else []
    if twins:
        how.append(f"{twins} rounding twin{'s' if twins > 1 else ''}")
    missing = sum(r["reference"] == "missing" for r in records)
    partial = sum(r["reference"] == "partial" for r in records)
    tail = (f"; {missing} without a reference" if missing else "") + (f"; {partial} cut short" if partial else "")
    return f"References: {ok}/{len(compared)} images match" + (f" ({', '.join(how)})" if how else "") + tail


def failure_table(failures: list, min_ssim: float) -> str:
    lines = [f"{len(failures)} image(s) do not match their references (missing, cut short, not identical in "
             f"portable numerics, or their first {TRAJECTORY_STEPS} objective values differ by more than rounding does):",
             f"  {'setting':<10}{'unit':<22}{'first steps':>12}{'ssim':>8}"]

    def row(r):
        if r["reference"] == "missing":
            return f"  {r['setting']:<10}{r['unit']:<22}  no reference"
        if r["reference"] == "partial":
            return f"  {r['setting']:<10}{r['unit']:<22}  cut short at step {r.get('steps_run')} of {r.get('steps')}"
        if r.get("comparison") == "identical expected":
            return f"  {r['setting']:<10}{r['unit']:<22}  not identical (both in portable numerics){r['ssim']:>8.3f}"
        if r["ssim"] is None:
            return f"  {r['setting']:<10}{r['unit']:<22}  damaged reference ({r.get('reference_error', '')})"
        t = r.get("trajectory_difference")
        return f"  {r['setting']:<10}{r['unit']:<22}{'-' if t is None else f'{t:.1e}':>12}{r['ssim']:>8.3f}"

    lines += [row(r) for r in failures]
    settings = sorted({r["setting"] for r in failures})
    lines.append(f"  settings with differing images: {', '.join(settings)}")
    return "\n".join(lines)
