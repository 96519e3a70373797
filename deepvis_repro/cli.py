"""The console scripts: deepvis-inspect, -optimize, -live, -reproduce, -convert here; deepvis-mine
(atlas/cli.py) and deepvis-search (search/command.py) beside them. Each runs in the console
shell (console.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .atlas.cli import mine_task
from .atlas.optimized import optimize_into_atlas
from .atlas.page import write_index
from .atlas.site import write_site
from .atlas.store import layer_slug
from .console import exit_interrupted, output_dir, resolve_device, run_app, seed_everything
from .errors import DeepvisError
from .files import check_output_dir, check_writable_file
from .images import load_image
from .labels import top_classes
from .numerics import Numerics
from .optimize import get_preset, optimize
from .optvis.convergence import Convergence, criterion_words
from .outputs import machine, versions, write_optimization
from .registry import instantiate_backend, instantiate_config
from .reproduce.compare import compare, failure_table
from .reproduce.harness import (check_profile, default_reference_dir, expected_images, rewrite_metrics, run_profile,
                                write_outputs, write_references)
from .reproduce.stats import fmt_interval
from .search.command import search_task
from .units import is_whole_layer, layer_shapes
from .validate import flag, number, whole


# ----- deepvis-inspect --------------------------------------------------------------------------
def inspect_task(cfg) -> None:
    import torch

    backend = instantiate_backend(cfg.backend).to(resolve_device(cfg.device))
    if cfg.image:
        image = load_image(cfg.image)
        scores = "prob" if "prob" in backend.layers else backend.output_layer
        shape = layer_shapes(backend, [scores])[scores]
        if scores != "prob" and not (len(shape) == 1 or shape[1:] == (1, 1)):
            raise DeepvisError(f"backend {backend.name} has no class output: its last layer {scores} is a map "
                               f"of shape {shape}, not class scores")
        if backend.labels is None:  # a model without a labels file still says which classes: by index
            print(f"(backend {backend.name} has no labels: classes by index"
                  + ("" if scores == "prob" else f", probabilities the softmax of {scores}")
                  + "; backend.labels=FILE names them)", file=sys.stderr)

        top_k = whole("top_k", cfg.top_k, 1)
        with torch.no_grad():
            out = backend.forward(backend.preprocess(image), [scores])[scores][0].flatten()
        prob = out if scores == "prob" else torch.softmax(out, 0)
        if not torch.isfinite(prob).all():
            raise DeepvisError(f"the model's output is NaN or infinite for {cfg.image}: it cannot classify "
                               "it (broken weights, or an input scaling it was not trained with?)")
        for i, label, v in top_classes(backend.labels, prob[None], top_k)[0]:
            print(f"{v:.4f}  {i:4d}  {label}")
        return
    h, w = backend.input_size
    layouts = {n: backend.layer_layout(n) for n in backend.layers}
    inverse_alias = {v: k for k, v in backend.aliases.items()}
    order = backend.channel_order
    note = {"RGB": "", "grey": " (1 channel: pictures are fed as their luma)",
            "BGR": " (images are given as RGB; swapped inside)"}.get(order, "")
    if backend.channels not in (1, 3):
        order, note = f"{backend.channels} channels", " (no picture can be fed to it)"
    print(f"backend {backend.name}: input {h}x{w}, {order}{note}, {len(backend.layers)} layers")
    labels = {n: n + (f" ({inverse_alias[n]})" if n in inverse_alias else "") for n in backend.layers}
    width = max([24] + [len(v) + 2 for v in labels.values()])  # long names keep their own column
    # the shape every tool reads (channels first, positions as a map), the model's own, and the layout
    print(f"{'layer':<{width}}{'output shape':<22}{'channels':>8}  {'layout (the model computes)'}")
    for name in backend.layers:
        lay = layouts[name]
        shape = lay.canonical_shape() if lay.decided else lay.raw
        channels = lay.channels if lay.decided else "-"
        raw = f" {lay.raw}" if lay.decided and tuple(lay.raw) != tuple(shape) else ""
        print(f"{labels[name]:<{width}}{str(shape):<22}{channels:>8}  {lay.describe()}{raw}")
    for name, why in getattr(backend, "not_layers", {}).items():  # values a user may look for, and why not
        print(f"not a layer: {name}: {why}")


def inspect_main() -> None:
    run_app("inspect", inspect_task)


# ----- deepvis-optimize -------------------------------------------------------------------------
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

    units = optimize_units(cfg)
    o = cfg.optimize
    # every option is checked before any work
    steps = whole("optimize.steps", o.steps, 1, allow_none=True)
    seed = whole("optimize.seed", o.seed, 0)
    batch_size = whole("optimize.batch_size", o.batch_size, 1, allow_none=True)
    lr_scale = number("optimize.lr_scale", o.lr_scale, positive=True, allow_none=True)
    numerics = Numerics(str(o.get("numerics", "default"))).mode
    fast = flag("optimize.fast", o.get("fast", False))
    converge = convergence_option(o.get("convergence"), fast)
    pre = flag("optimize.pre_activation", o.get("pre_activation", False))
    preset = get_preset(OmegaConf.to_container(cfg.regularization), steps=steps, start=o.start)
    atlas_mode = cfg.atlas.dir is not None or any(is_whole_layer(u) for u in units)
    engine = None
    if atlas_mode:
        engine = instantiate_config(cfg.engine, "engine")
    elif cfg.engine.get("_target_", "").endswith("RayEngine"):
        raise DeepvisError("engine=ray runs whole layers into an atlas: give 'units=[LAYER:all]' "
                           "or atlas.dir=DIR")
    seed_everything(seed)
    backend = instantiate_backend(cfg.backend).to(resolve_device(cfg.device))
    if atlas_mode:
        return optimize_atlas(cfg, backend, units, preset, seed, batch_size or 8, engine, lr_scale, converge, pre,
                              numerics)
    result = optimize(backend, units, preset=preset, seed=seed, batch_size=batch_size, numerics=numerics,
                      lr_scale=lr_scale, converge=converge, pre_activation=pre)
    out = output_dir()
    record = write_optimization(out, backend, result)
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
        exit_interrupted()


def convergence_option(value, fast: bool) -> Convergence | None:
    """optimize.convergence (window, rel_tol, min_steps, every) -> the fast mode's criterion; None
    when the fast mode is off, where a changed criterion would do nothing and is a mistake."""
    from omegaconf import OmegaConf

    given = OmegaConf.to_container(value) if OmegaConf.is_config(value) else (value or {})
    if not isinstance(given, dict):
        raise DeepvisError(f"optimize.convergence must hold window, rel_tol, min_steps and every, got {given!r}")
    default = Convergence().describe()
    unknown = sorted(set(given) - set(default))
    if unknown:
        raise DeepvisError(f"optimize.convergence has no {', '.join(unknown)}; it holds {', '.join(default)}")
    if not fast:
        changed = sorted(k for k, v in given.items() if v != default[k])
        if changed:
            raise DeepvisError(f"optimize.convergence.{changed[0]} is the fast mode's stop: add optimize.fast=true")
        return None
    return Convergence(window=whole("optimize.convergence.window", given.get("window", default["window"]), 1),
                       rel_tol=number("optimize.convergence.rel_tol", given.get("rel_tol", default["rel_tol"]),
                                      minimum=0, maximum=1),
                       min_steps=whole("optimize.convergence.min_steps", given.get("min_steps", default["min_steps"]), 1),
                       every=whole("optimize.convergence.every", given.get("every", default["every"]), 1))


def optimize_atlas(cfg, backend, units, preset, seed, batch_size, engine, lr_scale=None, fast=None,
                   pre_activation=False, numerics="default") -> None:
    """Whole layers (or the given units) into an atlas, resumable. fast: the fast mode's
    criterion (a Convergence), or None for the setting's full length."""
    atlas_dir = cfg.atlas.dir or os.path.join("atlas", layer_slug(backend.name))
    check_output_dir(atlas_dir, "atlas.dir")
    r = optimize_into_atlas(backend, atlas_dir, units, preset=preset, seed=seed, batch_size=batch_size,
                            engine=engine, lr_scale=lr_scale, fast=fast, pre_activation=pre_activation,
                            numerics=numerics)
    write_index(atlas_dir)
    if os.path.isfile(os.path.join(atlas_dir, "site", "index.html")):  # a site made by deepvis-mine: kept current
        write_site(atlas_dir)
    steps = f"{preset.steps} steps"
    if fast is not None:
        criterion = "" if fast == Convergence() else f" ({criterion_words(fast.describe())}, every {fast.every})"
        steps = f"converged{criterion} or {steps}"
    steps += f", numerics {r['numerics']}" if r["numerics"] != "default" else ""
    print(f"{r['written']} unit(s) optimized with {preset.name} ({steps}), {r['skipped']} "
          f"already in the atlas; atlas: {atlas_dir}")
    if r["interrupted"]:
        print(f"interrupted: {r['written'] + r['skipped']} of {r['units']} units are in {atlas_dir}; "
              "rerun the same command to continue", file=sys.stderr)
        exit_interrupted()


def optimize_main() -> None:
    run_app("optimize", optimize_task)


# ----- deepvis-live -----------------------------------------------------------------------------
def live_task(cfg) -> None:
    from omegaconf import OmegaConf

    from .live.app import LiveApp  # pygame: only deepvis-live loads it

    if OmegaConf.is_missing(cfg.source, "path"):
        raise DeepvisError(f"source {cfg.source._target_.rsplit('.', 1)[-1]} needs a path: "
                           "add source.path=...")
    backend = instantiate_backend(cfg.backend).to(resolve_device(cfg.device))
    source = instantiate_config(cfg.source, "source")
    live = OmegaConf.to_container(cfg.live)
    app = LiveApp(backend, source, **live)
    stats = app.run()
    print(f"{stats['frames']} frames, network {stats['net_fps']:.1f} fps, "
          f"display {stats['display_fps']:.1f} fps")
    if cfg.live.screenshot:
        print(f"screenshot: {cfg.live.screenshot}")
    if cfg.live.stats:
        print(f"stats: {cfg.live.stats}")


def live_main() -> None:
    run_app("live", live_task)


# ----- deepvis-reproduce ------------------------------------------------------------------------
def reproduce_task(cfg) -> None:
    from pathlib import Path

    from omegaconf import OmegaConf

    seed = whole("seed", cfg.seed, 0)
    threshold = number("ssim_threshold", cfg.ssim_threshold, minimum=-1.0, maximum=1.0)
    tolerance = number("rounding_tolerance", cfg.rounding_tolerance, minimum=0.0)
    median_tolerance = number("rounding_tolerance_median", cfg.rounding_tolerance_median, minimum=0.0)
    numerics = Numerics(str(cfg.numerics)).mode
    update = flag("update_references", cfg.update_references)
    drop = flag("drop_references", cfg.get("drop_references", False))
    no_compare = str(cfg.references).lower() == "none" if cfg.references is not None else False
    if no_compare and update:
        raise DeepvisError("update_references=true needs a folder to write: references=none only measures")
    if numerics == "bf16" and update:
        raise DeepvisError("update_references=true with numerics=bf16: references are float32 images "
                           "(numerics=portable, or default); bf16 runs are compared against them")
    seed_everything(seed)
    device = resolve_device(cfg.device)
    profile = OmegaConf.to_container(cfg.profile)
    backend = instantiate_backend(cfg.backend).to(device)
    presets, units = check_profile(backend, profile)  # every setting and unit, before any work (or the judge)
    ref_dir = Path(cfg.references) if cfg.references and not no_compare else \
        default_reference_dir(backend.name, profile["name"])
    if update and not drop:
        check_no_references_dropped(ref_dir, expected_images(presets, units))
    judge = None
    if cfg.judge is not None:
        judge = instantiate_backend(cfg.judge).to(device)
    command = "deepvis-reproduce " + " ".join(sys.argv[1:])
    here = machine()
    here["device"] = str(device)
    info = {"backend": backend.name, "profile": profile["name"], "seed": seed,
            "ssim_threshold": threshold, "min_ssim": threshold, "rounding_tolerance": tolerance,
            "rounding_tolerance_median": median_tolerance,
            "references": str(ref_dir),
            "judge": getattr(judge, "name", None), "command": command, "versions": versions(),
            "machine": here, "numerics_mode": numerics, "profile_config": profile}
    run = run_profile(backend, profile, seed=seed, judge=judge, numerics=numerics)
    failures = []
    updating = update and not run.interrupted
    if updating:
        for r in run.records:  # until the new set is swapped in, the old one stays in force
            r["reference"] = "being written"
    elif no_compare:
        for r in run.records:
            r["reference"] = "not compared"
    else:
        theirs = reference_manifest(ref_dir)
        info["reference_machine"] = theirs.get("machine")
        info["reference_numerics"] = theirs.get("numerics")
        # both sides portable on x86-64 CPUs: the same bits are then the criterion (numerics.py)
        bits = (numerics == "portable" and (theirs.get("numerics") or {}).get("mode") == "portable"
                and str(device) == "cpu" and here.get("arch") == "x86_64"
                and (theirs.get("machine") or {}).get("arch", "x86_64") == "x86_64")
        failures = compare(run, ref_dir, threshold, bits_expected=bits, tolerance=tolerance,
                           median_tolerance=median_tolerance)
    out = Path(output_dir())
    # The run's own outputs first: a signal while the references are written then loses nothing.
    metrics = write_outputs(out, backend, run, info, failures)
    if updating:
        try:
            write_references(run, ref_dir, {**{k: info[k] for k in ("backend", "profile", "seed", "command",
                                                                     "versions", "machine", "profile_config")},
                                            "numerics": run.numerics})
        except KeyboardInterrupt:
            print(f"interrupted while writing the new references: {ref_dir} keeps the old set; this run's "
                  f"images and report are in {out}", file=sys.stderr)
            exit_interrupted()
        rewrite_metrics(out, metrics)
    for s in metrics["summary"]:
        partial = "  (partial: interrupted)" if s["setting"] in metrics["partial_settings"] else ""
        ci = s["intervals"]
        print(f"{s['setting']:<8} activation {fmt_interval(ci['activation'])}  "
              f"TV {fmt_interval(ci['total_variation'], 4)}  HF {fmt_interval(ci['hf_energy'], 3)}  "
              f"median judge rank {fmt_interval(ci['judge_rank'], 0)}{partial}")
    missing = sum(r["reference"] == "missing" for r in run.records)
    if updating:
        print(f"wrote {len(run.records)} references to {ref_dir}")
    elif no_compare:
        print("References: not compared (references=none)")
    elif missing:
        print(f"{missing} image(s) have no reference in {ref_dir}"
              + ("" if ref_dir.is_dir() else " (no such folder)")
              + "; make them with update_references=true, or give references=none to only measure", file=sys.stderr)
    if metrics["verdict"]:
        print(metrics["verdict"])
    if metrics.get("claim_line"):
        print(metrics["claim_line"])
    print(f"report: {out / 'report.html'}")
    if run.interrupted:
        print("interrupted: the report holds what was finished (the last setting marked partial)", file=sys.stderr)
        exit_interrupted()
    if failures:
        print(failure_table(failures, threshold), file=sys.stderr)
        sys.exit(1)


def check_no_references_dropped(ref_dir, writes: set) -> None:
    """update_references=true replaces the whole set: refuse (before any work) when the set holds
    images this run does not make, unless drop_references=true says to drop them."""
    try:
        held = {p.name for p in Path(ref_dir).glob("*.png")}
    except OSError:
        return
    lost = sorted(held - writes)
    if lost:
        raise DeepvisError(f"update_references=true would drop {len(lost)} of the {len(held)} references in {ref_dir} "
                           f"that this run does not make ({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}); "
                           "run the profile that made them, or add drop_references=true to replace the set")


def reference_manifest(ref_dir) -> dict:
    """The stored references' manifest (how and where they were made), or {} if unreadable."""
    import json

    try:
        with open(os.path.join(ref_dir, "manifest.json"), encoding="utf-8") as f:
            m = json.load(f)
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def reproduce_main() -> None:
    run_app("reproduce", reproduce_task)


# ----- deepvis-convert ----------------------------------------------------------------------------
def convert_task(cfg) -> None:
    import time

    from omegaconf import OmegaConf

    out = str(cfg.output)
    if not out.endswith(".onnx"):
        raise DeepvisError(f"output must be a .onnx file, got '{out}'")

    check_writable_file(out, "output")
    target = str(cfg.backend.get("_target_", ""))
    if not target.startswith("deepvis_repro_backends.caffe_backend."):
        raise DeepvisError("deepvis-convert converts Caffe models: backend=caffe (with backend.prototxt and "
                           "backend.weights) or backend=caffenet (with backend.weights)")
    t0 = time.perf_counter()
    backend_cfg = OmegaConf.merge(cfg.backend, {"via": "direct"})
    backend = instantiate_backend(backend_cfg)
    t_load = time.perf_counter() - t0
    from deepvis_repro_backends.caffe_onnx import convert_caffe, write_onnx  # onnx: deepvis-convert's only

    model = convert_caffe(backend, backend.prototxt, backend.weights)
    write_onnx(model, out, check=bool(cfg.check))
    seconds = time.perf_counter() - t0
    size = os.path.getsize(out) / 1e6
    print(f"wrote {out}: {len(model.graph.node)} nodes, {len(backend.layers)} blobs, opset 17, {size:.1f} MB, "
          f"in {seconds:.1f} s (reading the Caffe files {t_load:.1f} s)"
          + ("; onnx.checker (full check) passed" if cfg.check else ""))
    print(f"use it with: backend=onnx backend.path={out}" + (" backend.labels=imagenet" if backend.labels else ""))


def convert_main() -> None:
    run_app("convert", convert_task)


# ----- deepvis-mine -------------------------------------------------------------------------------
def mine_main() -> None:
    run_app("mine", mine_task)


# ----- deepvis-search -----------------------------------------------------------------------------
def search_main() -> None:
    run_app("search", search_task)
