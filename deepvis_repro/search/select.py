"""The search's result: four best settings that differ from each other, as the paper's four do,
written as regularization presets with their provenance; and the Pareto figure."""
from __future__ import annotations

import os

import numpy as np
from omegaconf import OmegaConf

from ..files import write_text
from .space import coordinates, pattern, to_preset

MIN_DISTANCE = 0.35  # in the space's unit cube (space.coordinates), between two kept settings


def _kind(preset) -> tuple:
    """What makes two settings different methods: the image parametrization (a successor's
    settings use none of Table 1's regularizers) and which regularizers are on."""
    return (preset.param, pattern(preset))


def choose_best(rows: list[dict], space: dict, base_steps: int, k: int = 4) -> list[dict]:
    """The k best finished trials by score, each one differing from those kept before it: first
    by which regularizers it uses (as the paper's four settings differ), then, where too few
    patterns are among the good trials, by a distance of at least MIN_DISTANCE in the space.
    Trials stopped early rank after every finished one (their score is of a shorter run)."""
    ranked = sorted([r for r in rows if r.get("score") is not None],
                    key=lambda r: (r["status"] != "finished", -r["score"], int(r["trial"])))
    # each trial's pattern and place in the space, once
    kind = [_kind(to_preset(r["params"], base_steps)) for r in ranked]
    place = [coordinates(space, r["params"]) for r in ranked]
    kept: list[int] = []
    for rule in ("pattern", "distance", "any"):
        for i in range(len(ranked)):
            if len(kept) == k:
                return [ranked[j] for j in kept]
            if i in kept:
                continue
            if rule == "pattern" and any(kind[j] == kind[i] for j in kept):
                continue
            if rule in ("pattern", "distance") and any(
                    np.linalg.norm(place[i] - place[j]) / np.sqrt(len(place[i])) < MIN_DISTANCE for j in kept):
                continue
            kept.append(i)
    return [ranked[j] for j in kept]


def write_presets(folder: str, best: list[dict], base_steps: int, provenance: dict) -> list[str]:
    """best_1.yaml ... best_k.yaml: Preset fields (usable as regularization=FILE) and provenance."""
    paths = []
    for i, r in enumerate(best, 1):
        p = to_preset(r["params"], base_steps, name=f"best_{i}")
        d = {f: getattr(p, f) for f in p.__dataclass_fields__}
        d["provenance"] = {**provenance, "trial": int(r["trial"]), "rank": i,
                           "scores": {k: r.get(k) for k in ("score", "judge_rank_median", "judge_top5",
                                                            "recognizability", "relative_activation",
                                                            "feature_agreement", "total_variation",
                                                            "hf_energy")},
                           "regularizers": dict(zip(("decay", "blur", "small_norm", "small_contrib"),
                                                    pattern(p)))}
        path = os.path.join(folder, f"best_{i}.yaml")
        write_text(path, f"# setting {i} of the search in {os.path.abspath(folder)}: deepvis-optimize "
                         f"regularization={path}\n" + OmegaConf.to_yaml(OmegaConf.create(d)))
        paths.append(path)
    for stale in range(len(best) + 1, 5):  # a rerun that keeps fewer leaves no old file behind
        old = os.path.join(folder, f"best_{stale}.yaml")
        if os.path.exists(old):
            os.unlink(old)
    return paths


def pareto_figure(path: str, rows: list[dict], front: set[int], best: list[dict]) -> None:
    """Relative activation against recognizability, one point per trial; the front joined, the
    kept settings named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def v(r, k):
        x = r.get(k)
        return np.nan if x is None else float(x)

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    fin = [r for r in rows if r["status"] == "finished"]
    early = [r for r in rows if r["status"] != "finished"]
    ax.scatter([v(r, "relative_activation") for r in fin], [v(r, "recognizability") for r in fin],
               s=18, c="#4477aa", label="finished")
    if early:
        ax.scatter([v(r, "relative_activation") for r in early], [v(r, "recognizability") for r in early],
                   s=14, c="#bbbbbb", marker="x", label="stopped early")
    fr = sorted([r for r in rows if int(r["trial"]) in front], key=lambda r: v(r, "relative_activation"))
    ax.plot([v(r, "relative_activation") for r in fr], [v(r, "recognizability") for r in fr], c="#ee6677",
            lw=1, label="Pareto front")
    for i, r in enumerate(best, 1):
        ax.annotate(f"best_{i}", (v(r, "relative_activation"), v(r, "recognizability")), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("relative activation (1 = the best natural image)")
    ax.set_ylabel("recognizability (1 - ln rank / ln classes)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".partial.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
