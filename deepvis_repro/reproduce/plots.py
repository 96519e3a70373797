"""The report's plots, as PNG files a user can open (and report.html embeds): each setting's
objective per step, and each measure per setting with its bootstrap interval."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import atomic_write
from .stats import MEASURES


_TITLES = {"activation": "activation (mean)", "total_variation": "total variation (mean)",
           "hf_energy": "HF energy (mean)", "judge_rank": "judge rank (median, log)",
           "judge_top5": "class in judge's top 5 (share)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_write(path, "wb", fsync=False) as f:
        fig.savefig(f, format="png", dpi=100)


def write_plots(out: Path, metrics: dict) -> list[str]:
    """objective.png and measures.png in out; returns their names."""
    plt = _pyplot()
    names = []
    records = metrics["results"]
    settings = list(dict.fromkeys(r["setting"] for r in records))
    units = list(dict.fromkeys(r["unit"] for r in records))
    colours = {s: plt.cm.tab10(i % 10) for i, s in enumerate(settings)}

    # 1. objective per step: one panel per unit, one line per setting
    cols = min(4, len(units))
    rows = int(np.ceil(len(units) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, u in zip(axes.flat, units):
        for r in records:
            if r["unit"] == u and r.get("history"):
                h = np.array([np.nan if v is None else v for v in r["history"]], dtype=float)
                ax.plot(np.arange(len(h)), h, color=colours[r["setting"]], lw=1, label=r["setting"])
        label = next((r["label"] for r in records if r["unit"] == u and r.get("label")), None)
        ax.set_title(f"{u}" + (f" {label}" if label else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
    for ax in list(axes.flat)[len(units):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(settings), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    _save(fig, out / "objective.png")
    plt.close(fig)
    names.append("objective.png")

    # 2. each measure per setting with its interval
    summary = {s["setting"]: s["intervals"] for s in metrics["summary"]}
    shown = [m for m in MEASURES if any(summary[s].get(m) for s in settings)]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.8 * len(shown), 2.8), squeeze=False)
    for ax, m in zip(axes.flat, shown):
        for i, s in enumerate(settings):
            ci = summary[s].get(m)
            if not ci:
                continue
            est = ci["estimate"]
            ax.errorbar([i], [est], yerr=[[est - ci["low"]], [ci["high"] - est]], fmt="o",
                        color=colours[s], capsize=3)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(settings, rotation=45, fontsize=7)
        ax.set_title(_TITLES[m], fontsize=8)
        ax.tick_params(labelsize=7)
        if m == "judge_rank":
            ax.set_yscale("log")
            ax.invert_yaxis()  # rank 1 (recognized) on top
    fig.suptitle("95% bootstrap intervals over units", fontsize=8)
    fig.tight_layout()
    _save(fig, out / "measures.png")
    plt.close(fig)
    names.append("measures.png")
    return names
