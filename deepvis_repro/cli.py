"""Console scripts. Each is a Hydra app over one top config in conf/; user errors end it with one
line on stderr and exit status 2, Ctrl-C with status 130 after saving what there is."""
from __future__ import annotations

import os
import sys
from typing import Callable

from .errors import DeepvisError, did_you_mean


def resolve_device(device: str) -> str:
    import torch

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
    with torch.no_grad():
        acts = backend.forward(torch.zeros(1, 3, h, w, device=backend.device), backend.layers)
    inverse_alias = {v: k for k, v in backend.aliases.items()}
    print(f"backend {backend.name}: input {h}x{w} RGB, {len(backend.layers)} layers")
    print(f"{'layer':<24}{'output shape':<22}{'channels':>8}")
    for name in backend.layers:
        shape = tuple(acts[name].shape[1:])
        label = name + (f" ({inverse_alias[name]})" if name in inverse_alias else "")
        print(f"{label:<24}{str(shape):<22}{shape[0]:>8}")


def inspect_main() -> None:
    run_app("inspect", inspect_task)
