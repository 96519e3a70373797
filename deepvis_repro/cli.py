"""Console scripts. Each is a Hydra app over one top config in conf/; user errors end it with one
line on stderr and exit status 2, Ctrl-C with status 130 after saving what there is."""
from __future__ import annotations

import contextlib
import os
import sys
from importlib import resources
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
                out += ["backend=_by_name", f"++backend.name={value}"]
            else:
                raise DeepvisError(f"unknown backend '{value}'; " + did_you_mean(value, list_backends()))
        elif eq and key.startswith("backend.") and not key.startswith(("+", "~")):
            out.append("++" + a)
        elif eq and key in ("regularization", "source", "profile", "engine") and value not in config_names(key):
            raise DeepvisError(f"unknown {key} '{value}'; " + did_you_mean(value, config_names(key)))
        else:
            out.append(a)
    return out


def _config_keys(config_name: str, argv: list[str]) -> set[str]:
    """Every key the app's config has, as dotted paths, with each group's chosen option (the
    command line's choice, else the default) filled in: what a command reads."""
    from omegaconf import DictConfig, OmegaConf

    from .registry import CONF_PACKAGE

    conf = resources.files(CONF_PACKAGE)
    top = OmegaConf.create(conf.joinpath(f"{config_name}.yaml").read_text())
    chosen = {}
    for d in top.get("defaults", []):
        if isinstance(d, (dict, DictConfig)):
            for group, option in d.items():
                if not str(group).startswith("override"):
                    chosen[str(group)] = option
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key in chosen:
            chosen[key] = value
    keys: set[str] = set()

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                path = f"{prefix}.{k}" if prefix else str(k)
                keys.add(path)
                walk(path, v)

    plain = OmegaConf.to_container(top, resolve=False)  # keys only: ??? and ${...} stay as written
    walk("", {k: v for k, v in plain.items() if k not in ("defaults", "hydra")})
    for group, option in chosen.items():
        keys.add(group)
        path = conf.joinpath(group, f"{option}.yaml")
        if option and path.is_file():
            walk(group, OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=False))
    return keys


def check_keys(config_name: str, argv: list[str]) -> None:
    """A config key the command does not have is a mistake, said in one line with the nearest
    valid keys; so is a '+key' that adds a key no command reads (Hydra itself would suggest it
    for a typo, and then ignore the value)."""
    keys = None
    for a in argv:
        key, eq, _ = a.partition("=")
        if not eq or a.startswith("-"):
            continue
        bare = key.lstrip("+~")
        if bare.startswith(("hydra.", "backend.")) or bare in ("hydra", "backend"):
            continue  # Hydra's own settings; a backend's arguments are open (its class checks them)
        keys = keys if keys is not None else _config_keys(config_name, argv)
        if bare not in keys:
            near = sorted(k for k in keys if "." in bare and k.startswith(bare.rsplit(".", 1)[0] + "."))
            raise DeepvisError(f"unknown config key '{bare}' for deepvis-{config_name}; "
                               + did_you_mean(bare, near or sorted(k for k in keys if "." not in k)))
        if key.startswith("+") and not key.startswith("++"):
            raise DeepvisError(f"'{key}' adds a key, but {bare} exists: write {bare}=... without the '+'")


def _error(prog: str, msg: str) -> None:
    print(f"{prog}: error: {msg}", file=sys.stderr)


#: What to give for a mandatory option (``???`` in a config) that the user left out.
MISSING_HINTS = {
    "backend.weights": "backend.weights=PATH (e.g. bvlc_reference_caffenet.caffemodel)",
    "backend.prototxt": "backend.prototxt=PATH (the deploy.prototxt)",
    "backend.path": "backend.path=PATH (the .onnx file)",
    "output": "output=PATH.onnx",
    "source.path": "source.path=PATH",
}


def check_missing(cfg) -> None:
    """One line for mandatory values left out (``backend=caffenet`` without its weights), before
    anything is instantiated."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise DeepvisError("missing " + "; ".join(
            f"{k}: give {MISSING_HINTS.get(k, k + '=...')}" for k in missing))


def unique_run_dir(base: str) -> str:
    """Hydra's run folder, made unique: two runs started in the same second get base and
    base_1 (os.mkdir is atomic, so no two runs can both take one name)."""
    parent = os.path.dirname(base)
    try:
        if parent:
            os.makedirs(parent, exist_ok=True)
        for n in range(10_000):
            path = base if n == 0 else f"{base}_{n}"
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue
    except OSError as e:  # a read-only or full working folder: say so, and how to choose another
        raise DeepvisError(f"cannot make the run folder {os.path.abspath(base)}: {e.strerror}; "
                           "run from a writable folder or give hydra.run.dir=DIR") from None
    raise DeepvisError(f"cannot make a new run folder next to {base}")


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("unique_dir"):
        # use_cache: Hydra resolves hydra.run.dir more than once; the folder is made once
        OmegaConf.register_new_resolver("unique_dir", lambda base: unique_run_dir(str(base)), use_cache=True)


def _drop_empty_run_dir() -> None:
    """A run that failed before writing anything leaves no folder behind (Hydra's own .hydra/
    and log are not results)."""
    import shutil

    try:
        from hydra.core.hydra_config import HydraConfig

        out = HydraConfig.get().runtime.output_dir
    except Exception:
        return
    if os.path.abspath(out) == os.path.abspath(os.getcwd()) or not os.path.isdir(out):
        return
    left = [n for n in os.listdir(out) if n != ".hydra" and not n.endswith(".log")]
    if not left:
        shutil.rmtree(out, ignore_errors=True)


_terminated = False


def _on_sigterm(signum, frame):
    """SIGTERM ends a run as Ctrl-C does: what is done is saved (exit status 143)."""
    global _terminated
    from .files import Terminated

    _terminated = True
    raise Terminated


def exit_interrupted() -> None:
    sys.exit(143 if _terminated else 130)


#: Commands that write a run folder of their own under outputs/.
RUN_FOLDER_APPS = ("optimize", "reproduce")


def run_app(config_name: str, task: Callable) -> None:
    """Run ``task(cfg)`` as a Hydra app on conf/<config_name>.yaml. A user's mistake (a value, a
    path, a config key) ends it with one line and exit status 2; Ctrl-C with 130, SIGTERM with 143,
    after saving what there is."""
    import signal

    import hydra

    prog = os.path.basename(sys.argv[0]) or f"deepvis-{config_name}"
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints, escaped
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    try:
        check_keys(config_name, sys.argv[1:])
        sys.argv = [sys.argv[0]] + _rewrite_backend_args(sys.argv[1:])
        if config_name in RUN_FOLDER_APPS and not any(a.lstrip("+").startswith("hydra.run.dir=") for a in sys.argv):
            from .files import check_output_dir

            try:  # Hydra would make it inside a resolver, where an error is a 100-line traceback
                check_output_dir("outputs", "hydra.run.dir")
            except DeepvisError as e:
                raise DeepvisError(f"{e}; run from a writable folder or give hydra.run.dir=DIR") from None
    except DeepvisError as e:
        _error(prog, str(e))
        sys.exit(2)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _register_resolvers()
    started = []
    gate = _Gate(sys.stderr)

    @hydra.main(config_path="pkg://deepvis_repro_conf", config_name=config_name, version_base="1.3")
    def main(cfg):
        started.append(True)
        gate.open()  # from here on, stderr is the task's own, unbuffered
        try:
            check_missing(cfg)
            task(cfg)
            _drop_empty_run_dir()  # a run whose results went elsewhere (an atlas, the screen) leaves no folder
        except DeepvisError as e:
            _drop_empty_run_dir()
            _error(prog, str(e))
            sys.exit(2)
        except BrokenPipeError:  # `deepvis-inspect | head`: the reader left, not an error
            sys.stderr.close()
            os._exit(0)
        except KeyboardInterrupt as e:
            from .files import Terminated

            global _terminated
            _terminated = _terminated or isinstance(e, Terminated)
            _drop_empty_run_dir()
            _error(prog, "terminated" if _terminated else "interrupted")
            exit_interrupted()

    helping = any(a in sys.argv for a in ("--help", "-h", "--cfg", "--info", "--hydra-help"))
    if helping:
        gate.open()
    try:
        # Until the task starts, what Hydra says goes through the gate: its errors (an unknown key,
        # a bad override, an unwritable run folder) are the user's mistakes: one line, status 2.
        with contextlib.redirect_stderr(gate):
            main()
    except SystemExit as e:
        if started or e.code in (0, None) or helping:
            gate.open()
            raise
        message = _hydra_message(gate.held())
        gate.discard()  # replaced by the one line
        gate.open()
        _error(prog, message or f"invalid command line (status {e.code})")
        sys.exit(2)
    finally:
        gate.open()


class _Gate:
    """stderr before the task starts: held (Hydra's reports, reduced to one line on error);
    once opened, written straight through."""

    def __init__(self, stream):
        self.stream, self.is_open, self._held = stream, False, []

    def write(self, text):
        if self.is_open:
            return self.stream.write(text)
        self._held.append(text)
        return len(text)

    def flush(self):
        if self.is_open:
            self.stream.flush()

    def open(self):
        if not self.is_open:
            self.is_open = True
            self.stream.write("".join(self._held))
            self._held = []

    def held(self) -> str:
        return "".join(self._held)

    def discard(self):
        self._held = []

    def isatty(self):
        return self.stream.isatty()

    def fileno(self):
        return self.stream.fileno()


def _hydra_message(text: str) -> str:
    """Hydra's error report, as one line: its first lines up to the hint about stack traces, or
    for an error it met making the run folder (reported with a traceback), the final error."""
    import re

    if "Traceback" in text:
        errors = re.findall(r"^(\w+(?:Error|Exception)): (.*)$", text, flags=re.M)
        if errors:
            kind, msg = errors[-1]
            if kind in ("FileNotFoundError", "PermissionError", "NotADirectoryError", "OSError",
                        "FileExistsError"):
                return f"cannot make the run folder: {msg}"
            return f"{kind}: {msg}"
    lines = [l.strip() for l in text.strip().splitlines() if l.strip() and "HYDRA_FULL_ERROR" not in l]
    keep = [l for l in lines if not l.startswith(("full_key", "object_type", "reference_type"))]
    return " ".join(keep)[:300]


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
        from .validate import whole

        top_k = whole("top_k", cfg.top_k, 1)
        with torch.no_grad():
            prob = backend.forward(backend.preprocess(image), ["prob"])["prob"][0]
        if not torch.isfinite(prob).all():
            raise DeepvisError(f"the model's output is NaN or infinite for {cfg.image}: it cannot classify "
                               "it (broken weights, or an input scaling it was not trained with?)")
        values, idx = prob.topk(min(top_k, prob.numel()))
        for v, i in zip(values.tolist(), idx.tolist()):
            print(f"{v:.4f}  {i:4d}  {backend.labels[i] if i < len(backend.labels) else i}")
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

    from .numerics import Numerics
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
    numerics = Numerics(str(o.get("numerics", "default"))).mode
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
        backend.lr_scale = lr_scale  # what optimize() and the atlas's workers use by default
    if atlas_mode:
        return optimize_atlas(cfg, backend, units, preset, seed, batch_size or 8, engine)
    result = optimize(backend, units, preset=preset, seed=seed, batch_size=batch_size, numerics=numerics)
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


def optimize_atlas(cfg, backend, units, preset, seed, batch_size, engine) -> None:
    """Whole layers (or the given units) into an atlas, resumable."""
    from .atlas.optimized import optimize_into_atlas
    from .atlas.page import write_index
    from .atlas.store import layer_slug
    from .files import check_output_dir

    atlas_dir = cfg.atlas.dir or os.path.join("atlas", layer_slug(backend.name))
    check_output_dir(atlas_dir, "atlas.dir")
    r = optimize_into_atlas(backend, atlas_dir, units, preset=preset, seed=seed, batch_size=batch_size,
                            engine=engine)
    write_index(atlas_dir)
    print(f"{r['written']} unit(s) optimized with {preset.name} ({preset.steps} steps), {r['skipped']} "
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

    from .numerics import Numerics
    from .outputs import machine, versions
    from .registry import instantiate_backend
    from .reproduce.compare import compare, failure_table
    from .reproduce.harness import (check_profile, default_reference_dir, rewrite_metrics, run_profile,
                                    write_outputs, write_references)
    from .reproduce.stats import fmt_interval
    from .validate import number, whole

    seed = whole("seed", cfg.seed, 0)
    threshold = number("ssim_threshold", cfg.ssim_threshold, minimum=-1.0, maximum=1.0)
    tolerance = number("rounding_tolerance", cfg.rounding_tolerance, minimum=0.0)
    median_tolerance = number("rounding_tolerance_median", cfg.rounding_tolerance_median, minimum=0.0)
    numerics = Numerics(str(cfg.numerics)).mode
    seed_everything(seed)
    device = resolve_device(cfg.device)
    profile = OmegaConf.to_container(cfg.profile)
    backend = instantiate_backend(cfg.backend).to(device)
    check_profile(backend, profile)  # every setting and unit, before any work (or the judge's load)
    judge = None
    if cfg.judge is not None:
        judge = instantiate_backend(cfg.judge).to(device)
    ref_dir = Path(cfg.references) if cfg.references else default_reference_dir(backend.name, profile["name"])
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
    updating = bool(cfg.update_references) and not run.interrupted
    if updating:
        for r in run.records:  # until the new set is swapped in, the old one stays in force
            r["reference"] = "being written"
    else:
        theirs = reference_manifest(ref_dir)
        info["reference_machine"] = theirs.get("machine")
        info["reference_numerics"] = theirs.get("numerics")
        bits = (numerics == "portable" and (theirs.get("numerics") or {}).get("mode") == "portable"
                and str(device) == "cpu")
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
    elif missing:
        print(f"note: {missing} image(s) have no reference in {ref_dir}; "
              "make them with update_references=true", file=sys.stderr)
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

    from .registry import instantiate_backend

    out = str(cfg.output)
    if not out.endswith(".onnx"):
        raise DeepvisError(f"output must be a .onnx file, got '{out}'")
    from .files import check_writable_file

    check_writable_file(out, "output")
    target = str(cfg.backend.get("_target_", ""))
    if not target.startswith("deepvis_repro_backends.caffe_backend."):
        raise DeepvisError("deepvis-convert converts Caffe models: backend=caffe (with backend.prototxt and "
                           "backend.weights) or backend=caffenet (with backend.weights)")
    t0 = time.perf_counter()
    backend_cfg = OmegaConf.merge(cfg.backend, {"via": "direct"})
    backend = instantiate_backend(backend_cfg)
    t_load = time.perf_counter() - t0
    from deepvis_repro_backends.caffe_onnx import convert_caffe, write_onnx

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
    from .atlas.cli import mine_task

    run_app("mine", mine_task)
