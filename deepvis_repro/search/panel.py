"""The scoring panel: what a setting's images are worth, measured rather than judged by eye.

For each search unit, from the optimized image and the unit's best activation:
- class units (the output layer of a labelled backend): the judge network's rank of the class
  (1 = top), as the harness measures it, and recognizability = 1 - ln(rank) / ln(classes), 1 at
  rank 1 and 0 at the last;
- every unit: relative activation = (best - natural mean) / (natural max - natural mean) over a
  corpus of natural images (the demo corpus by default): 1 reaches the best natural image;
- hidden units (no class): feature agreement = cosine, in the judge's penultimate features with
  the corpus mean removed, between the image and the mean of the unit's top natural images;
- every image: total variation and high-frequency energy (reproduce/metrics.py).

The composite score picks the best settings (README: "The search"): the mean over units of a
per-unit score in [0, 1]: recognizability for class units, and for hidden units the feature
agreement (clipped at 0) times the relative activation (clipped to [0, 1]), so that an image
must both look like what drives the unit and drive it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..atlas.corpus import load_items, open_corpus
from ..errors import DeepvisError
from ..files import load_sealed_npz, save_sealed_npz
from ..progress import progress as progress_bar
from ..reproduce.metrics import high_frequency_energy, total_variation
from ..units import Unit, gather_units, resolve_units, value_layers


TOP_NATURAL = 5  # top natural images per hidden unit, whose judge features the image should share


def feature_layer(judge) -> str:
    """The judge's penultimate layer (its features before the classifier)."""
    layers = [l for l in judge.layers if l != "prob"]
    if len(layers) < 2:
        raise DeepvisError(f"the judge {judge.name} has no layer before its output to take features from")
    return layers[-2]


def _features(judge, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled penultimate features) of a preprocessed batch."""
    out, feat = judge.output_layer, feature_layer(judge)
    with torch.no_grad():
        a = judge.forward(x, [feat, out])
    f = a[feat]
    f = f.flatten(2).mean(2) if f.dim() >= 3 else f
    return a[out].flatten(1).double(), f.double()


@dataclass
class Panel:
    units: list[Unit]
    classes: list[int | None]      # the class of each unit (None: hidden)
    natural_mean: np.ndarray       # (U,) the unit's mean over the corpus
    natural_max: np.ndarray        # (U,) its maximum
    top_features: np.ndarray       # (U, F) the judge's features of its top natural images, mean (corpus mean removed)
    corpus_feature_mean: np.ndarray  # (F,)
    n_classes: int
    corpus: str
    corpus_size: int

    def measure(self, judge, images: np.ndarray, best_activation: np.ndarray) -> dict:
        """Every measure of one setting's images (N,H,W,3 uint8, one per unit, in order)."""
        x = torch.cat([judge.preprocess(im) for im in images])
        logits, feats = _features(judge, x)
        logits, feats = logits.cpu().numpy(), feats.cpu().numpy() - self.corpus_feature_mean
        per_unit = []
        for i, (u, c) in enumerate(zip(self.units, self.classes)):
            act = float(best_activation[i])
            span = self.natural_max[i] - self.natural_mean[i]
            rel = (act - self.natural_mean[i]) / span if span > 0 and math.isfinite(act) else float("nan")
            row = {"unit": str(u), "class": c, "activation": act, "relative_activation": float(rel),
                   "total_variation": total_variation(images[i]), "hf_energy": high_frequency_energy(images[i])}
            if c is not None:
                rank = int((logits[i] > logits[i, c]).sum()) + 1
                row["judge_rank"] = rank
                row["unit_score"] = 1.0 - math.log(rank) / math.log(self.n_classes)
            else:
                a, b = feats[i], self.top_features[i]
                cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
                row["feature_agreement"] = cos
                row["unit_score"] = max(0.0, cos) * (min(1.0, max(0.0, rel)) if math.isfinite(rel) else 0.0)
            per_unit.append(row)
        return summarize(per_unit)


def summarize(per_unit: list[dict]) -> dict:
    """The trial's measures: means over units (the judge rank's median over class units)."""
    def mean(key):
        v = [r[key] for r in per_unit if r.get(key) is not None and math.isfinite(r[key])]
        return float(np.mean(v)) if v else None

    ranks = [r["judge_rank"] for r in per_unit if r.get("judge_rank") is not None]
    cls = [r["unit_score"] for r in per_unit if r.get("judge_rank") is not None]
    return {"score": mean("unit_score"), "judge_rank_median": float(np.median(ranks)) if ranks else None,
            "judge_top5": int(sum(r <= 5 for r in ranks)) if ranks else None,
            "recognizability": float(np.mean(cls)) if cls else None,
            "relative_activation": mean("relative_activation"), "feature_agreement": mean("feature_agreement"),
            "total_variation": mean("total_variation"), "hf_energy": mean("hf_energy"), "units": per_unit}


def unit_classes(backend, units) -> list[int | None]:
    """The class each unit stands for: its channel in the output layer of a labelled model, else
    None (a hidden unit)."""
    out = backend.output_layer
    return [u.channel if u.layer == out and backend.labels else None for u in units]


def build_panel(backend, judge, unit_specs, corpus=None, batch: int = 32, progress: bool = True) -> Panel:
    """The panel for these units: each unit's natural statistics over the corpus (a folder, a list,
    a video, or None for the demo corpus), mined once before the trials."""
    units = resolve_units(backend, unit_specs)
    classes = unit_classes(backend, units)
    n_classes = len(judge.labels) if judge.labels else 0
    if any(c is not None for c in classes) and not n_classes:
        raise DeepvisError(f"the judge {judge.name} has no class labels to rank the class units by")
    if judge.labels and backend.labels and len(judge.labels) != len(backend.labels):
        raise DeepvisError(f"the judge {judge.name} has {len(judge.labels)} classes, the backend "
                           f"{backend.name} {len(backend.labels)}: a judge must know the backend's classes")
    c = open_corpus(corpus)
    layers = value_layers(backend, units)  # with the prefix tokens of token units (blocks.5:3:cls)
    acts, feats = [], []
    with progress_bar(total=len(c.items), desc="scoring panel: natural images", unit="image",
                      enabled=progress, leave=False) as bar:
        for s in range(0, len(c.items), batch):
            images = [im for im in load_items(c.items[s:s + batch]) if isinstance(im, np.ndarray)]
            if images:
                with torch.no_grad():
                    a = backend.forward(torch.cat([backend.preprocess(im) for im in images]), layers)
                    acts.append(gather_all(a, units, backend).cpu().double().numpy())
                    feats.append(_features(judge, torch.cat([judge.preprocess(im) for im in images]))[1].cpu().numpy())
            bar.update(len(c.items[s:s + batch]))
    if not acts:
        raise DeepvisError(f"the corpus {c.source or c.kind} has no readable image to measure the units on")
    acts, feats = np.concatenate(acts), np.concatenate(feats)
    fmean = feats.mean(0)
    top = np.argsort(-acts, axis=0, kind="stable")[:TOP_NATURAL]  # (k, U)
    top_features = np.stack([feats[top[:, i]].mean(0) - fmean for i in range(len(units))])
    return Panel(units, classes, acts.mean(0), acts.max(0), top_features, fmean, n_classes,
                 c.kind if c.kind == "demo" else c.source, len(acts))


ARRAYS = ("natural_mean", "natural_max", "top_features", "corpus_feature_mean")


def save_panel(path: str, panel: Panel) -> None:
    """The panel's corpus statistics, sealed (a rerun of the search reads them instead of
    measuring the corpus again; a damaged file is measured again)."""
    save_sealed_npz(path, **{k: getattr(panel, k) for k in ARRAYS},
                    meta=np.array(json.dumps({"n_classes": panel.n_classes, "corpus": panel.corpus,
                                              "corpus_size": panel.corpus_size})))


def load_or_build_panel(path: str, backend, judge, unit_specs, corpus=None) -> Panel:
    units = resolve_units(backend, unit_specs)
    if os.path.exists(path):
        try:
            a = load_sealed_npz(path, "scoring panel")
            meta = json.loads(str(a["meta"]))
            if a["natural_mean"].shape == (len(units),):
                return Panel(units, unit_classes(backend, units), *(a[k] for k in ARRAYS), int(meta["n_classes"]), meta["corpus"],
                             int(meta["corpus_size"]))
        except (DeepvisError, KeyError, ValueError):
            pass  # measured again below
    panel = build_panel(backend, judge, unit_specs, corpus)
    save_panel(path, panel)
    return panel


def gather_all(acts: dict, units: list[Unit], backend=None) -> torch.Tensor:
    """(images, units): every unit's value on every image of a batch (gather_units pairs the
    i-th image with the i-th unit; the backend names a token unit's prefix token)."""
    n = next(iter(acts.values())).shape[0]
    return torch.stack([gather_units(acts, [u] * n, backend) for u in units], 1)
