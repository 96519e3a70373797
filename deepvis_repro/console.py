"""The console shell every command runs in: a Hydra app over one top config in conf/; user
errors end it with one line on stderr and exit status 2, Ctrl-C with status 130 (SIGTERM 143)
after saving what there is. The commands themselves are in cli.py, atlas/cli.py and
search/command.py; they import this module, never the other way round."""
from __future__ import annotations

import contextlib
import os
import sys
from importlib import resources
from typing import Callable

from .allocator import keep_freed_memory
from .errors import DeepvisError, did_you_mean
from .files import Terminated, check_output_dir
from .registry import CONF_PACKAGE, _is_yaml_path, backend_kind, config_names
from .validate import device_name


def resolve_device(device: str) -> str:
    import torch

    device = None if device is None else device_name(device)
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DeepvisError(f"device '{device}' asked for, but torch sees no CUDA GPU; use device=cpu")
    return str(device)


def _rewrite_backend_args(argv: list[str]) -> list[str]:
    """Let ``backend=NAME`` name any backend load_backend knows (config, yaml path, plugin), and
    ``backend.KEY=VALUE`` set any argument of it, not only those its yaml lists."""
    out = []
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key == "backend":  # a config stays a Hydra group choice; a file or plugin goes through load_backend
            out += [a] if backend_kind(value) == "config" else ["backend=_by_name", f"++backend.name={value}"]
        elif eq and key.startswith("backend.") and not key.startswith(("+", "~")):
            out.append("++" + a)
        elif eq and key == "regularization" and _is_yaml_path(value):
            if not os.path.isfile(value):
                raise DeepvisError(f"setting file not found: {value}")
            out += ["regularization=_file", f"++regularization.file={hydra_quoted(os.path.abspath(value), key)}"]
        elif eq and key in ("regularization", "source", "profile", "engine", "search") and value not in config_names(key):
            raise DeepvisError(f"unknown {key} '{value}'; " + did_you_mean(value, config_names(key)))
        else:
            out.append(a)
    return out


def hydra_quoted(path: str, key: str) -> str:
    """A file path as one quoted value of Hydra's override grammar (a comma, a bracket or a space
    in it would otherwise be grammar); a path that is not UTF-8 is refused in one line."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise DeepvisError(f"{key}: the path {path.encode('utf-8', 'surrogateescape')!r} is not UTF-8; "
                           "rename the file") from None
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _config_keys(config_name: str, argv: list[str]) -> set[str]:
    """Every key the app's config has, as dotted paths, with each group's chosen option (the
    command line's choice, else the default) filled in: what a command reads."""
    from omegaconf import DictConfig, OmegaConf

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
        # and the folders Hydra made above it (outputs/<date>/, outputs/) once they are empty
        here, parent = os.path.abspath(os.getcwd()), os.path.dirname(os.path.abspath(out))
        while parent.startswith(here + os.sep):
            try:
                os.rmdir(parent)  # only an empty folder goes
            except OSError:
                break
            parent = os.path.dirname(parent)


_terminated = False


def _on_sigterm(signum, frame):
    """SIGTERM ends a run as Ctrl-C does: what is done is saved (exit status 143)."""
    global _terminated
    _terminated = True
    raise Terminated


def exit_interrupted() -> None:
    sys.exit(143 if _terminated else 130)


#: Commands that write a run folder of their own under outputs/.
RUN_FOLDER_APPS = ("optimize", "reproduce", "search")


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
            try:  # Hydra would make it inside a resolver, where an error is a 100-line traceback
                check_output_dir("outputs", "hydra.run.dir")
            except DeepvisError as e:
                raise DeepvisError(f"{e}; run from a writable folder or give hydra.run.dir=DIR") from None
    except DeepvisError as e:
        _error(prog, str(e))
        sys.exit(2)
    signal.signal(signal.SIGTERM, _on_sigterm)
    keep_freed_memory()  # before torch allocates: see allocator.py
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
