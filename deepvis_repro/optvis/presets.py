"""Settings of the optimizer (presets): the paper's Table 1 (conf/regularization/paper_*.yaml),
plain ascent (none), and its successors (lucid, maco): what to run, not how."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from importlib import resources

from omegaconf import OmegaConf

from ..errors import DeepvisError
from ..files import load_yaml_file
from ..validate import number, safe_name, slug, whole
from .regularizers import check_regularization

#: image parametrizations: the paper's pixels, Lucid's decorrelated Fourier basis, MACO's phase
PARAMS = ("pixels", "fourier", "maco")
#: the paper's learning-rate policies (pixels) and the successors' optimizers (fourier, maco)
PAPER_POLICIES = ("constant", "progress", "progress01")
ADAPTIVE_POLICIES = ("adam", "nadam")
#: robustness transforms: none (the paper), lucid (pad, jitter, scale, rotate), crops (MACO)
TRANSFORMS = ("none", "lucid", "crops")

#: Bounds on sizes a setting file may ask for: far past any use, short of an allocation failure.
MAX_STEPS = 100_000
MAX_CROPS = 256


@dataclass(frozen=True)
class Preset:
    """One hyperparameter setting: regularization, learning-rate policy, length, start, and for the
    successors the image parametrization and the transforms."""
    name: str = "custom"
    decay: float = 0.0
    blur_radius: float = 0.0
    blur_every: int = 0
    small_norm_pct: float = 0.0
    small_contrib_pct: float = 0.0
    lr_policy: str = "constant"  # constant | progress | progress01
    lr: float = 100.0
    max_lr: float = 100.0
    desired_prog: float = 2.0
    early_prog: float = 0.03
    late_prog_mult: float = 0.1
    steps: int = 1000
    start: str = "mean_plus_rand"  # mean_plus_rand | mean | randu (pixels only)
    # The successors (Lucid, MACO); the paper's settings keep these defaults.
    param: str = "pixels"           # pixels | fourier | maco
    transforms: str = "none"        # none | lucid | crops
    crops: int = 1                  # transformed copies per step (MACO's crops); the objective is their mean
    crop_min: float = 0.5           # crops' side as a fraction of the image (transforms=crops)
    crop_max: float = 0.9
    noise: float = 0.0              # Gaussian noise on each crop, std as a fraction of 0..255
    decay_power: float = 1.0        # fourier: the spectrum's 1/f^decay_power scaling

    def regularization(self) -> dict:
        return {k: getattr(self, k) for k in
                ("decay", "blur_radius", "blur_every", "small_norm_pct", "small_contrib_pct")}

    def validate(self) -> "Preset":
        """A copy with every field checked and converted (a typed 'abc' or 2.5 steps is a
        DeepvisError naming the field), or the error."""
        numeric = {k: number(k, getattr(self, k)) for k in (
            "decay", "blur_radius", "small_norm_pct", "small_contrib_pct", "lr", "max_lr", "desired_prog",
            "early_prog", "late_prog_mult", "crop_min", "crop_max", "noise", "decay_power")}
        p = replace(self, **numeric, blur_every=whole("blur_every", self.blur_every, 0),
                    steps=whole("steps", self.steps, 1), crops=whole("crops", self.crops, 1),
                    name=safe_name("setting name", self.name))  # it names output files
        if p.steps > MAX_STEPS or p.crops > MAX_CROPS or p.blur_every > MAX_STEPS:
            raise DeepvisError(f"steps, blur_every and crops must be at most {MAX_STEPS:,}, {MAX_STEPS:,} and "
                               f"{MAX_CROPS}; got {p.steps}, {p.blur_every}, {p.crops}")
        for k in ("early_prog", "late_prog_mult"):
            if getattr(p, k) < 0:  # a negative desired progress runs the ascent backwards
                raise DeepvisError(f"{k} must be >= 0, got {getattr(p, k)}")
        check_regularization(**p.regularization())
        if p.param not in PARAMS:
            raise DeepvisError(f"param must be one of {', '.join(PARAMS)}, got '{p.param}'")
        if p.transforms not in TRANSFORMS:
            raise DeepvisError(f"transforms must be one of {', '.join(TRANSFORMS)}, got '{p.transforms}'")
        policies = PAPER_POLICIES if p.param == "pixels" else ADAPTIVE_POLICIES
        if p.lr_policy not in policies:
            raise DeepvisError(f"lr_policy for param={p.param} must be {', '.join(policies)}, got '{p.lr_policy}'"
                               + (" (adam and nadam step the successors' parameters, not pixels)"
                                  if p.param == "pixels" and p.lr_policy in ADAPTIVE_POLICIES else ""))
        if p.param != "pixels" and any(v for v in p.regularization().values()):
            # Table 1's regularizers act on pixels; in a Fourier or phase basis the basis itself regularizes
            raise DeepvisError(f"param={p.param} takes none of the paper's regularizers (decay, blur_radius, "
                               "blur_every, small_norm_pct, small_contrib_pct must be 0)")
        if p.start not in ("mean_plus_rand", "mean", "randu"):
            raise DeepvisError(f"start must be mean_plus_rand, mean or randu, got '{p.start}'")
        for k in ("lr", "max_lr", "desired_prog"):
            if getattr(p, k) <= 0:
                raise DeepvisError(f"{k} must be a positive number, got {getattr(p, k)}")
        if not 0 < p.crop_min <= p.crop_max <= 1:
            raise DeepvisError(f"crop_min and crop_max must satisfy 0 < crop_min <= crop_max <= 1, got "
                               f"{p.crop_min}, {p.crop_max}")
        if p.noise < 0 or p.decay_power < 0:
            raise DeepvisError(f"noise and decay_power must be >= 0, got {p.noise}, {p.decay_power}")
        return p


def _load_presets() -> dict[str, Preset]:
    folder = resources.files("deepvis_repro_conf").joinpath("regularization")
    out = {}
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.endswith(".yaml") and not p.name.startswith("_"):  # _file.yaml: regularization=FILE
            d = OmegaConf.to_container(OmegaConf.create(p.read_text()))
            out[d["name"]] = Preset(**d)
    return out


#: paper_1 .. paper_4 (Table 1) and none (plain gradient ascent), from conf/regularization/.
PRESETS: dict[str, Preset] = _load_presets()


def preset_from_file(path: str) -> Preset:
    """A setting written as a yaml file (the fields of Preset; a search's best_N.yaml), so that a
    profile can run it beside the paper's: 'profile.settings=[paper_3,my/best_1.yaml]'. Its
    ``name`` names output files, so it is checked (a file's own name is made safe instead); a
    file named like a built-in setting must be that setting."""
    if not os.path.isfile(path):
        raise DeepvisError(f"setting file not found: {path}")
    d = OmegaConf.to_container(load_yaml_file(path, "setting file"))
    fields = set(Preset.__dataclass_fields__)
    if not isinstance(d, dict) or set(d) - fields - {"_target_", "provenance"}:
        bad = sorted(map(str, set(d) - fields)) if isinstance(d, dict) else []
        raise DeepvisError(f"setting file {path} must hold Preset fields"
                           + (f"; unknown: {', '.join(bad[:10])}" if bad else "") + f" (valid: {', '.join(sorted(fields))})")
    d = {k: v for k, v in d.items() if k in fields}
    if "name" in d:
        safe_name(f"the name in setting file {path}:", d["name"])
    else:
        d["name"] = slug(os.path.splitext(os.path.basename(path))[0])
    try:
        p = Preset(**d)
    except TypeError as e:
        raise DeepvisError(f"setting file {path}: {e}") from None
    builtin = PRESETS.get(p.name)
    if builtin is not None and p.validate() != builtin.validate():
        raise DeepvisError(f"setting file {path} is named '{p.name}' like the built-in setting, but differs from "
                           "it; give it another name (its results would be mixed with the built-in's)")
    return p


def get_preset(preset, **overrides) -> Preset:
    if isinstance(preset, Preset):
        p = preset
    elif isinstance(preset, dict) and set(preset) == {"file"}:  # regularization=FILE on the command line
        p = preset_from_file(str(preset["file"]))
    elif isinstance(preset, dict):
        p = Preset(**preset)
    elif preset in PRESETS:
        p = PRESETS[preset]
    elif isinstance(preset, str) and preset.endswith((".yaml", ".yml")):
        p = preset_from_file(preset)
    else:
        raise DeepvisError(f"unknown preset '{preset}'; valid: {', '.join(PRESETS)}, or a .yaml file of one")
    fields = set(Preset.__dataclass_fields__)
    bad = set(overrides) - fields
    if bad:
        raise DeepvisError(f"unknown optimizer option(s) {', '.join(sorted(bad))}; valid: {', '.join(sorted(fields))}")
    return replace(p, **{k: v for k, v in overrides.items() if v is not None}).validate()


