"""How a name becomes a backend: ``load_backend(name, **overrides)``.

A name is, in this order: a yaml file path; a config in ``conf/backend/`` (composed with Hydra's
compose API); or an entry point in the group ``deepvis_repro.backends`` (a class or factory that
takes the overrides as keyword arguments). Third-party packages add backends through that group
without touching this code.
"""
from __future__ import annotations

import os
from importlib import metadata, resources

from omegaconf import DictConfig, OmegaConf

from .errors import DeepvisError, did_you_mean
from .files import load_yaml_file

ENTRY_POINT_GROUP = "deepvis_repro.backends"
CONF_PACKAGE = "deepvis_repro_conf"


def config_names(group: str) -> list[str]:
    """Names of the yaml configs in one group of conf/ (e.g. 'backend', 'regularization')."""
    folder = resources.files(CONF_PACKAGE).joinpath(group)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")
                  and not p.name.startswith("_"))


def entry_points() -> dict:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def list_backends() -> list[str]:
    """Every name load_backend accepts (configs first, then plugins without a config)."""
    names = config_names("backend")
    return names + sorted(set(entry_points()) - set(names))


def _is_yaml_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or os.sep in name


def backend_kind(name: str) -> str:
    """What a backend name is: "config" (conf/backend/<name>.yaml), "file" (a yaml path) or
    "plugin" (an entry point); an unknown name or a missing file is a DeepvisError. The one
    resolver of names: load_backend and the command lines (console.py) both ask it."""
    name = str(name)
    if name in config_names("backend"):
        return "config"
    if _is_yaml_path(name):
        if not os.path.isfile(name):
            raise DeepvisError(f"backend config file not found: {name}")
        return "file"
    if name in entry_points():
        return "plugin"
    raise DeepvisError(f"unknown backend '{name}'; " + did_you_mean(name, list_backends()))


def backend_config(name: str) -> DictConfig:
    """The backend's config, composed from conf/backend/<name>.yaml (or read from a yaml path)."""
    if _is_yaml_path(name):
        if not os.path.isfile(name):
            raise DeepvisError(f"backend config file not found: {name}")
        cfg = load_yaml_file(name, "backend config")  # bounded: a YAML bomb is refused, not expanded
        if not isinstance(cfg, DictConfig) or "_target_" not in cfg:
            raise DeepvisError(f"backend config {name} needs a '_target_' key naming the backend class")
        return cfg
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        # Already inside a Hydra app: the group file is a plain config without a defaults list.
        text = resources.files(CONF_PACKAGE).joinpath(f"backend/{name}.yaml").read_text()
        return OmegaConf.create(text)
    with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
        return compose(config_name=f"backend/{name}").backend


def instantiate_config(cfg, what: str = "backend", **overrides):
    """Instantiate a config (``_target_`` plus arguments: a backend, a live-view source), turning
    a user's mistake (a bad option, a missing file) that Hydra wraps into one DeepvisError."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if overrides:  # any argument of the target, listed in its yaml or not
        cfg = OmegaConf.create(OmegaConf.to_container(cfg))
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    target = cfg.get("_target_", "?")
    try:
        return instantiate(cfg, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, DeepvisError):
            raise cause from None
        if isinstance(cause, TypeError) and "argument" in str(cause):
            raise DeepvisError(f"{what} {target}: {cause}") from None
        if cause is None and "Error locating target" in str(e):
            raise DeepvisError(f"{what} _target_ '{target}' cannot be imported") from None
        raise


def instantiate_backend(cfg, **overrides):
    return instantiate_config(cfg, "backend", **overrides)


def load_backend(name: str = "efficientnet_lite0", **overrides):
    """Load a backend by config name, yaml path or entry-point name, with keyword overrides of
    its config (``load_backend("torchvision", arch="alexnet", weights=None)``)."""
    name = str(name)
    if backend_kind(name) != "plugin":
        return instantiate_backend(backend_config(name), **overrides)
    ep = entry_points()[name]
    try:
        factory = ep.load()
    except Exception as e:
        raise DeepvisError(f"backend plugin '{name}' ({ep.value}) failed to import: {e}") from None
    try:
        return factory(**overrides)
    except TypeError as e:
        raise DeepvisError(f"backend plugin '{name}': {e}") from None
