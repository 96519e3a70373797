"""Console scripts. Each is a Hydra app over one top config in conf/; user errors end it with one
line on stderr and exit status 2, Ctrl-C with status 130 after saving what there is."""
from __future__ import annotations

import os
import sys
from typing import Callable

from .errors import DeepvisError, did_you_mean


def resolve_device(device: str) -> str:
    import torch

    from .validate import device_name

    device = None if device is None else device_name(device)
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DeepvisError(f"device '{device}' asked for, but torch sees no CUDA GPU; use device=cpu")
    return str(device)


def _rewrite_backend_args(argv: list[str]) -> list[str]:
    """Let ``backend=NAME`` name any backend load_backend knows (config, yaml path, plugin), and
    ``backend.KEY=VALUE`` set any argument of it, not only those its yaml lists."""
    from .registry import _is_yaml_path, config_names, list_backends

    out = []
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key == "backend":
            if value in config_names("backend"):
                out.append(a)
            elif _is_yaml_path(value) or value in list_backends():
                if _is_yaml_path(value) and not os.path.isfile(value):
                    raise DeepvisError(f"backend config file not found: {value}")
                out += ["backend=_by_name", f"+backend.name={value}"]
            else:
                raise DeepvisError(f"unknown backend '{value}'; " + did_you_mean(value, list_backends()))
        elif eq and key.startswith("backend.") and not key.startswith(("+", "~")):
            out.append("++" + a)
        elif eq and key in ("regularization", "source", "profile", "engine") and value not in config_names(key):
            raise DeepvisError(f"unknown {key} '{value}'; " + did_you_mean(value, config_names(key)))
        else:
            out.append(a)
    return out


def _error(prog: str, msg: str) -> None:
    print(f"{prog}: error: {msg}", file=sys.stderr)


def run_app(config_name: str, task: Callable) -> None:
    """Run ``task(cfg)`` as a Hydra app on conf/<config_name>.yaml."""
    import hydra

    prog = os.path.basename(sys.argv[0]) or f"deepvis-{config_name}"
    try:
        sys.argv = [sys.argv[0]] + _rewrite_backend_args(sys.argv[1:])
    except DeepvisError as e:
        _error(prog, str(e))
        sys.exit(2)

    @hydra.main(config_path="pkg://deepvis_repro_conf", config_name=config_name, version_base="1.3")
    def main(cfg):
        try:
            task(cfg)
        except DeepvisError as e:
            _error(prog, str(e))
            sys.exit(2)
        except BrokenPipeError:  # `deepvis-inspect | head`: the reader left, not an error
            sys.stderr.close()
            os._exit(0)
        except KeyboardInterrupt:
            _error(prog, "interrupted")
            sys.exit(130)

    main()


# ----- deepvis-inspect --------------------------------------------------------------------------
def inspect_task(cfg) -> None:
    import torch

    from .images import load_image
    from .registry import instantiate_backend
    from .units import layer_shapes

    backend = instantiate_backend(cfg.backend).to(resolve_device(cfg.device))
    if cfg.image:
        image = load_image(cfg.image)
        if backend.labels is None:
            raise DeepvisError(f"backend {backend.name} has no class labels to name what is in an image")
        top_k = int(cfg.top_k)
        if not 1 <= top_k <= len(backend.labels):
            raise DeepvisError(f"top_k must be in 1..{len(backend.labels)}, got {top_k}")
        with torch.no_grad():
            prob = backend.forward(backend.preprocess(image), ["prob"])["prob"][0]
        values, idx = prob.topk(top_k)
        for v, i in zip(values.tolist(), idx.tolist()):
            print(f"{v:.4f}  {i:4d}  {backend.labels[i]}")
        return
    h, w = backend.input_size
    shapes = layer_shapes(backend, backend.layers)
    inverse_alias = {v: k for k, v in backend.aliases.items()}
    print(f"backend {backend.name}: input {h}x{w} RGB, {len(backend.layers)} layers")
    print(f"{'layer':<24}{'output shape':<22}{'channels':>8}")
    for name in backend.layers:
        shape = shapes[name]
        label = name + (f" ({inverse_alias[name]})" if name in inverse_alias else "")
        print(f"{label:<24}{str(shape):<22}{shape[0]:>8}")


def inspect_main() -> None:
    run_app("inspect", inspect_task)


# ----- deepvis-optimize -------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def optimize_units(cfg) -> list:
    """The units asked for: ``units`` if given (an empty list is an error, not fc:130), else ``unit``."""
    from omegaconf import ListConfig

    if cfg.units is not None:
        units = list(cfg.units) if isinstance(cfg.units, (list, tuple, ListConfig)) else [cfg.units]
        if not units:
            raise DeepvisError("units=[] names no units; give at least one, e.g. 'units=[fc:130]' "
                               "or a whole layer, 'units=[blocks.10:all]'")
        return [str(u) for u in units]
    if cfg.unit in (None, ""):
        raise DeepvisError("no unit given; e.g. unit=fc:130")
    return [str(cfg.unit)]


def optimize_task(cfg) -> None:
    from omegaconf import OmegaConf

    from .optimize import get_preset, optimize
    from .outputs import write_optimization
    from .registry import instantiate_backend
    from .validate import number, whole

    units = optimize_units(cfg)
    o = cfg.optimize
    # every option is checked before any work
    steps = whole("optimize.steps", o.steps, 1, allow_none=True)
    seed = whole("optimize.seed", o.seed, 0)
    batch_size = whole("optimize.batch_size", o.batch_size, 1, allow_none=True)
    lr_scale = number("optimize.lr_scale", o.lr_scale, positive=True, allow_none=True)
    preset = get_preset(OmegaConf.to_container(cfg.regularization), steps=steps, start=o.start)
    atlas_mode = cfg.atlas.dir is not None or any(u.endswith(":all") for u in units)
    engine = None
    if atlas_mode:
        from .registry import instantiate_config

        engine = instantiate_config(cfg.engine, "engine")
    elif cfg.engine.get("_target_", "").endswith("RayEngine"):
        raise DeepvisError("engine=ray runs whole layers into an atlas: give 'units=[LAYER:all]' "
                           "or atlas.dir=DIR")
    seed_everything(seed)
    backend = instantiate_backend(cfg.backend).to(resolve_device(cfg.device))
    if lr_scale is not None:
        backend.lr_scale = lr_scale
    if atlas_mode:
        return optimize_atlas(cfg, backend, units, preset, seed, batch_size or 8, engine)
    result = optimize(backend, units, preset=preset, seed=seed, batch_size=batch_size, lr_scale=lr_scale)
    out = output_dir()
    record = write_optimization(out, backend, result, interrupted_ok=True)
    for r in record["results"]:
        label = f" ({r['label']})" if r["label"] else ""
        top = r["image_top5"][0][0] if r["image_top5"] else "-"
        best = "none (no finite value)" if r["best_activation"] is None else f"{r['best_activation']:.3f}"
        print(f"{r['unit']}{label}: best {best} at step {r['best_step']}; the image's top class: {top}")
        if r["stopped"]:
            print(f"warning: {r['unit']} stopped at step {r['stopped']['step']}: "
                  f"{r['stopped']['reason']}; kept its best image", file=sys.stderr)
    print(f"wrote {out}")
    if record.get("report_error"):
        print(f"warning: {record['report_error']}", file=sys.stderr)
    if result.interrupted:
        print("interrupted: saved the best images so far", file=sys.stderr)
        sys.exit(130)


def optimize_atlas(cfg, backend, units, preset, seed, batch_size, engine) -> None:
    """Whole layers (or the given units) into an atlas, resumable."""
    from .atlas.optimized import optimize_into_atlas
    from .atlas.page import write_index
    from .atlas.store import layer_slug

    atlas_dir = cfg.atlas.dir or os.path.join("atlas", layer_slug(backend.name))
    r = optimize_into_atlas(backend, atlas_dir, units, preset=preset, seed=seed, batch_size=batch_size,
                            engine=engine)
    write_index(atlas_dir)
    print(f"{r['written']} unit(s) optimized with {preset.name} ({preset.steps} steps), {r['skipped']} "
          f"already in the atlas; atlas: {atlas_dir}")
    if r["interrupted"]:
        print(f"interrupted: {r['written'] + r['skipped']} of {r['units']} units are in {atlas_dir}; "
              "rerun the same command to continue", file=sys.stderr)
        sys.exit(130)


def optimize_main() -> None:
    run_app("optimize", optimize_task)


# ----- deepvis-live -----------------------------------------------------------------------------
def live_task(cfg) -> None:
    from omegaconf import OmegaConf

    from .live.app import LiveApp
    from .registry import instantiate_backend, instantiate_config

    if OmegaConf.is_missing(cfg.source, "path"):
        raise DeepvisError(f"source {cfg.source._target_.rsplit('.', 1)[-1]} needs a path: "
                           "add source.path=...")
    backend = instantiate_backend(cfg.backend).to(resolve_device(cfg.device))
    source = instantiate_config(cfg.source, "source")
    live = OmegaConf.to_container(cfg.live)
    app = LiveApp(backend, source, **live)
    stats = app.run()
    if cfg.live.stats is None and cfg.live.max_frames:
        print(f"{stats['frames']} frames, network {stats['net_fps']:.1f} fps, "
              f"display {stats['display_fps']:.1f} fps")


def live_main() -> None:
    run_app("live", live_task)


# ----- deepvis-reproduce ------------------------------------------------------------------------
def reproduce_task(cfg) -> None:
    from pathlib import Path

    from omegaconf import OmegaConf

    from .outputs import versions
    from .registry import instantiate_backend
    from .reproduce.harness import (compare, default_reference_dir, failure_table, run_profile,
                                    write_outputs, write_references)

    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    backend = instantiate_backend(cfg.backend).to(device)
    judge = None
    if cfg.judge is not None:
        judge = instantiate_backend(cfg.judge).to(device)
    profile = OmegaConf.to_container(cfg.profile)
    ref_dir = Path(cfg.references) if cfg.references else default_reference_dir(backend.name, profile["name"])
    command = "deepvis-reproduce " + " ".join(sys.argv[1:])
    info = {"backend": backend.name, "profile": profile["name"], "seed": int(cfg.seed),
            "ssim_threshold": float(cfg.ssim_threshold), "references": str(ref_dir),
            "judge": getattr(judge, "name", None), "command": command, "versions": versions(),
            "profile_config": profile}
    run = run_profile(backend, profile, seed=int(cfg.seed), judge=judge)
    failures = []
    if cfg.update_references and not run.interrupted:
        write_references(run, ref_dir, {k: info[k] for k in ("backend", "profile", "seed", "command", "versions")})
    else:
        failures = compare(run, ref_dir, float(cfg.ssim_threshold))
    out = Path(output_dir())
    metrics = write_outputs(out, backend, run, info, failures)
    for s in metrics["summary"]:
        rank = "-" if s["median_judge_rank"] is None else f"{s['median_judge_rank']:.0f}"
        print(f"{s['setting']:<8} activation {s['mean_activation']:8.2f}  TV {s['mean_total_variation']:.4f}  "
              f"HF {s['mean_hf_energy']:.4f}  median judge rank {rank}")
    missing = sum(r["reference"] == "missing" for r in run.records)
    if cfg.update_references and not run.interrupted:
        print(f"wrote {len(run.records)} references to {ref_dir}")
    elif missing:
        print(f"note: {missing} image(s) have no reference in {ref_dir}; "
              "make them with update_references=true", file=sys.stderr)
    print(f"report: {out / 'report.html'}")
    if run.interrupted:
        print("interrupted: the report holds what was finished", file=sys.stderr)
        sys.exit(130)
    if failures:
        print(failure_table(failures, float(cfg.ssim_threshold)), file=sys.stderr)
        sys.exit(1)


def reproduce_main() -> None:
    run_app("reproduce", reproduce_task)


# ----- deepvis-mine -------------------------------------------------------------------------------
def mine_main() -> None:
    from .atlas.cli import mine_task

    run_app("mine", mine_task)
