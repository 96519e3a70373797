"""How an image is compared with its stored reference.

1. **identical**: the same pixels. Runs in portable numerics (deepvis_repro/numerics.py) give
   the same bits on any x86-64 CPU with FMA and any thread count, so this is the normal case.
2. **rounding criterion**, where bits cannot be equal (a GPU, another architecture, a scalar
   build, default numerics on another CPU): the image passes when it is a *rounding twin* of the
   reference: SSIM at least ``min_ssim``. Gradient ascent amplifies a last-bit difference into a
   visible one, but a twin keeps the reference's structure, while a changed setting (blur width,
   decay, a percentile, the learning rate), another seed or another unit starts another trajectory.
   The threshold is calibrated by benchmarks/calibrate_comparison.py (README: "How references are
   compared", with the measured margins).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .metrics import ssim

#: Calibrated on the quick profile (README): rounding twins >= 0.84, real changes <= 0.63.
DEFAULT_MIN_SSIM = 0.75


def compare(run, ref_dir: Path, min_ssim: float = DEFAULT_MIN_SSIM, bits_expected: bool = True) -> list[dict]:
    """Fill each record's reference status (match, differs, missing, damaged: an unreadable file),
    its ssim and how it was compared (identical, or the rounding criterion); return the failures
    (differs and damaged). bits_expected says whether the run and the references were both made
    in portable numerics, where any difference at all is worth a note."""
    from ..references import recover

    recover(ref_dir)
    failures = []
    for r in run.records:
        path = ref_dir / Path(r["image"]).name
        if not path.is_file():
            r["reference"], r["ssim"], r["comparison"] = "missing", None, None
            continue
        try:
            with Image.open(path) as im:
                ref = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            r["reference"], r["ssim"], r["comparison"] = "damaged", None, None
            r["reference_error"] = f"{path.name}: {e}"
            failures.append(r)
            continue
        img = run.images[(r["setting"], r["unit"])]
        if img.shape == ref.shape and np.array_equal(img, ref):
            r["reference"], r["ssim"], r["comparison"] = "match", 1.0, "identical"
            continue
        r["ssim"] = ssim(img, ref)
        r["comparison"] = "rounding criterion"
        r["bits_expected"] = bool(bits_expected)
        ok = bool(np.isfinite(r["ssim"]) and r["ssim"] >= min_ssim)
        r["reference"] = "match" if ok else "differs"
        if not ok:
            failures.append(r)
    return failures


def verdict(records: list, min_ssim: float) -> str | None:
    """'15/15 images match the references (15 identical)', or None when none was compared."""
    compared = [r for r in records if r["reference"] in ("match", "differs", "damaged")]
    if not compared:
        return None
    ok = sum(r["reference"] == "match" for r in compared)
    same = sum(r.get("comparison") == "identical" for r in compared)
    twins = ok - same
    how = [f"{same} identical"] if same else []
    if twins:
        how.append(f"{twins} rounding twin{'s' if twins > 1 else ''} (SSIM >= {min_ssim:g})")
    missing = sum(r["reference"] == "missing" for r in records)
    tail = f"; {missing} without a reference" if missing else ""
    return f"References: {ok}/{len(compared)} images match" + (f" ({', '.join(how)})" if how else "") + tail


def failure_table(failures: list, min_ssim: float) -> str:
    lines = [f"{len(failures)} image(s) differ from their references (not identical, and SSIM < {min_ssim:g}, "
             "beyond what rounding does):",
             f"  {'setting':<10}{'unit':<22}{'ssim':>8}"]
    lines += [f"  {r['setting']:<10}{r['unit']:<22}" + (f"{r['ssim']:>8.3f}" if r["ssim"] is not None else
              f"  damaged reference ({r.get('reference_error', '')})") for r in failures]
    settings = sorted({r["setting"] for r in failures})
    lines.append(f"  settings with differing images: {', '.join(settings)}")
    return "\n".join(lines)
