"""Validation of a search on units it never saw: the kept settings, the paper's four and plain
gradient ascent run through the reproduction harness on held-out units, with the harness's
intervals and paired tests, and each kept setting compared with the paper's set 3."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from ..errors import DeepvisError
from ..validate import whole
from ..images import figure_grid, save_png, stretched
from ..optimize import PRESETS
from ..reproduce.harness import run_profile, write_outputs
from ..reproduce.stats import by_unit, fmt_p, paired


PAPER = ("paper_1", "paper_2", "paper_3", "paper_4", "none")


def holdout_profile(backend, holdout: dict, search_units: list[str], steps: int, best_paths: list[str]) -> dict:
    """The harness profile: the paper's settings at the search's step budget (so that every
    setting has the same budget as in the search), the kept settings as they are, and the
    held-out classes that are not search units."""
    out = backend.output_layer
    searched = {str(u) for u in search_units}
    listed = holdout.get("classes") or []
    if not isinstance(listed, (list, tuple)):
        raise DeepvisError(f"search.holdout.classes must be a list, got {listed!r}"[:300])
    classes = [c for c in (whole("search.holdout.classes entry", c, 0) for c in listed) if f"{out}:{c}" not in searched]
    settings = [{**asdict(PRESETS[n]), "steps": int(steps)} for n in PAPER] + list(best_paths)
    if not classes and not holdout.get("hidden"):
        raise DeepvisError("search.holdout names no unit the search did not see")
    return {"name": "holdout", "settings": settings, "classes": classes,
            "hidden": holdout.get("hidden") or [], "steps": None}


def validate(backend, judge, profile: dict, out: Path, info: dict, seed: int = 0,
             numerics: str = "default", progress: bool = True) -> dict:
    """Run the profile into out/ (images, grid, report.html, metrics.json as deepvis-reproduce
    writes them) and compare each kept setting with paper_3 on the judge's rank."""
    run = run_profile(backend, profile, seed=seed, judge=judge, progress=progress, numerics=numerics)
    metrics = write_outputs(out, backend, run, {**info, "profile": "holdout", "seed": seed}, [])
    comparison_figure(out / "search_vs_paper.png", run.records, run.images)
    settings = list(dict.fromkeys(r["setting"] for r in run.records))
    units = list(dict.fromkeys(r["unit"] for r in run.records if r.get("judge_rank") is not None))
    vs = []
    for s in settings:
        if s.startswith("best_"):
            p = paired(s, by_unit(run.records, s, "judge_rank", units), "paper_3",
                       by_unit(run.records, "paper_3", "judge_rank", units), "judge_rank", seed)
            vs.append(p.as_dict() if p else {"a": s, "b": "paper_3", "n": 0})
    return {"metrics": metrics, "vs_paper_3": vs, "interrupted": run.interrupted,
            "report": os.fspath(out / "report.html")}


def comparison_line(p: dict) -> str:
    """'best_1 vs paper_3 (judge rank, 8 held-out units): median difference -4 [-9, 0], p = 0.04: better'."""
    if not p.get("n"):
        return f"{p['a']} vs {p['b']}: no held-out class unit to compare on"
    pv = p.get("p_value")
    if pv is None or pv >= 0.05:
        word = "no significant difference"
    elif p["low"] > 0 or p["high"] < 0:  # the test and the interval agree
        word = "better" if p["high"] < 0 else "worse"
    else:
        word = f"{'better' if p['rank_biserial'] < 0 else 'worse'} by the test, but the interval reaches 0"
    return (f"{p['a']} vs {p['b']} (judge rank, {p['n']} held-out class units): median difference "
            f"{p['median_difference']:+.1f} [95% CI {p['low']:+.1f}, {p['high']:+.1f}], Wilcoxon p = {fmt_p(pv)}: {word}")


def comparison_figure(path: Path, records: list, images: dict) -> None:
    """The kept settings, paper_3 and plain gradient ascent on the held-out units, one row each,
    contrast-stretched around grey (as the README's figures)."""
    settings = [s for s in dict.fromkeys(r["setting"] for r in records) if s.startswith("best_")]
    settings += [s for s in ("paper_3", "none") if any(r["setting"] == s for r in records)]
    units = list(dict.fromkeys(r["unit"] for r in records))
    labels = {r["unit"]: r["label"] for r in records}
    rows = [[None if images.get((s, u)) is None else stretched(images[(s, u)]) for u in units] for s in settings]
    cols = [f"{u} {labels[u] or ''}".strip() for u in units]
    save_png(path, figure_grid(rows, row_labels=settings, col_labels=cols, tile=128))
