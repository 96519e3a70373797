"""The search space over Table 1's hyperparameters (conf/search/*.yaml, key ``space``).

Each regularizer is switched on or off by a parameter of its own (``decay_on`` ...), as the
paper's four settings each use some of the four and not others; its value is sampled only
matters when on. Learning rates are in the paper's units (100 is CaffeNet's lr) and multiply
the backend's calibrated lr_scale, as the paper's presets do; ``steps`` is a fraction of the
search's step budget.

An optional ``method`` entry (``choices`` among pixels, lucid, maco) makes the paper's successors
a choice too: a trial that draws lucid or maco runs that preset (its own basis, transforms and
optimizer; of the sampled values only ``steps`` applies). Without it the space is Table 1's alone,
and with it Table 1's draws are still those of a space without it (method has a stream of its own).

Two samplers: ``random`` (the paper's method: each parameter drawn independently, from numpy's
RandomState so trial i is the same setting on every machine and every restart) and ``tpe``
(Optuna's model-based sampler through Ray Tune's OptunaSearch).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..errors import DeepvisError
from ..optimize import PRESETS, Preset

#: the regularizers' switches and the value fields each one turns on
SWITCHES = {"decay_on": ("decay",), "blur_on": ("blur_radius", "blur_every"),
            "norm_on": ("small_norm_pct",), "contrib_on": ("small_contrib_pct",)}
NUMERIC = ("decay", "blur_radius", "small_norm_pct", "small_contrib_pct", "lr", "max_lr", "desired_prog")
CHOICE = ("blur_every", "lr_policy", "steps")
METHODS = ("pixels", "lucid", "maco")  # the paper's pixels with Table 1's regularizers, or a successor


def _entry(space: dict, name: str, what: str) -> dict:
    d = space[name]
    if d is None:
        return {}
    if not isinstance(d, dict):  # search.space.decay=5
        raise DeepvisError(f"search.space.{name} must be a mapping with {what}, got {d!r}"[:300])
    return d


def _float(name: str, key: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise DeepvisError(f"search.space.{name}.{key} must be a number, got {v!r}"[:300]) from None
    if not math.isfinite(f):
        raise DeepvisError(f"search.space.{name}.{key} must be a finite number, got {v!r}")
    return f


def check_space(space: dict) -> dict:
    """The space as plain dicts, every entry checked: {name: {low, high, log} | {choices} | {p_on}}.
    Every value a trial can draw is checked too (each bound and each choice, as a setting): a value
    no trial could run with is one line here, not a failure inside every trial."""
    space = dict(space or {})
    need = set(NUMERIC) | set(CHOICE) | set(SWITCHES)
    missing, unknown = need - set(space), set(space) - need - {"method"}
    if missing or unknown:
        raise DeepvisError("search.space must give " + ", ".join(sorted(need))
                           + (f"; missing: {', '.join(sorted(missing))}" if missing else "")
                           + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))
    out = {}
    for name in NUMERIC:
        d = _entry(space, name, "low and high")
        if "low" not in d or "high" not in d:
            raise DeepvisError(f"search.space.{name} needs numbers low and high, got {d}"[:300])
        low, high = _float(name, "low", d["low"]), _float(name, "high", d["high"])
        log = d.get("log", False)
        if not isinstance(log, bool):
            raise DeepvisError(f"search.space.{name}.log must be true or false, got {log!r}"[:300])
        if not low < high or (log and low <= 0):
            raise DeepvisError(f"search.space.{name}: need low < high (and low > 0 with log), got {low}, {high}")
        out[name] = {"low": low, "high": high, "log": log}
    for name in CHOICE:
        choices = _entry(space, name, "a list 'choices'").get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise DeepvisError(f"search.space.{name} needs a non-empty list 'choices', got {choices!r}"[:300])
        out[name] = {"choices": list(choices)}
    for c in out["lr_policy"]["choices"]:
        if c not in ("constant", "progress", "progress01"):
            raise DeepvisError(f"search.space.lr_policy: unknown policy {c!r} (constant, progress, progress01)")
    for c in out["steps"]["choices"]:
        if isinstance(c, bool) or not 0 < _float("steps", "choices", c) <= 1:
            raise DeepvisError(f"search.space.steps: fractions of search.steps in (0, 1], got {c!r}")
    for c in out["blur_every"]["choices"]:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise DeepvisError(f"search.space.blur_every: whole numbers of steps >= 1, got {c!r}")
    for name in SWITCHES:
        p = _float(name, "p_on", _entry(space, name, "p_on").get("p_on", 0.5))
        if not 0 <= p <= 1:
            raise DeepvisError(f"search.space.{name}.p_on must be in [0, 1], got {p}")
        out[name] = {"p_on": p}
    if "method" in space:
        choices = _entry(space, "method", "a list 'choices'").get("choices")
        choices = list(choices) if isinstance(choices, (list, tuple)) else []
        bad = [c for c in choices if c not in METHODS]
        if not choices or bad:
            raise DeepvisError(f"search.space.method needs 'choices' among {', '.join(METHODS)}"
                               + (f"; unknown: {', '.join(map(str, bad))}" if bad else ""))
        if choices != ["pixels"]:  # pixels alone is Table 1's space: the same identity and draws as without
            out["method"] = {"choices": list(dict.fromkeys(choices))}
    _check_draws(out)
    return out


def _check_draws(space: dict) -> None:
    """Each bound of each range and each choice, as the one value that differs from a setting with
    every regularizer on, made into a Preset and validated (decay 2 or a negative lr fail here)."""
    base = {n: space[n]["low"] for n in NUMERIC} | {n: space[n]["choices"][0] for n in CHOICE} \
        | {n: True for n in SWITCHES}
    try:
        to_preset(base, 1000)
    except DeepvisError as e:
        raise DeepvisError(f"search.space: a trial drawing the ranges' low ends could not run: {e}") from None
    trials = [(n, v) for n in NUMERIC for v in (space[n]["low"], space[n]["high"])]
    trials += [(n, v) for n in CHOICE for v in space[n]["choices"]]
    for name, v in trials:
        try:
            to_preset({**base, name: v}, 1000)
        except DeepvisError as e:
            raise DeepvisError(f"search.space.{name}: a trial drawing {v!r} could not run: {e}") from None


def sample(space: dict, n: int, seed: int) -> list[dict]:
    """The paper's random search: n settings, each parameter drawn independently (log-uniform
    where log, else uniform; choices uniformly; switches on with p_on). Deterministic: the same
    list for the same space and seed, so a restarted search knows trial i's setting."""
    rs = np.random.RandomState(int(seed))
    methods = np.random.RandomState([int(seed), 2])  # its own stream: Table 1's draws stay as without it
    out = []
    for _ in range(int(n)):
        p = {}
        for name in NUMERIC:
            d = space[name]
            if d["log"]:
                p[name] = float(math.exp(rs.uniform(math.log(d["low"]), math.log(d["high"]))))
            else:
                p[name] = float(rs.uniform(d["low"], d["high"]))
        for name in CHOICE:
            p[name] = space[name]["choices"][rs.randint(len(space[name]["choices"]))]
        for name in SWITCHES:
            p[name] = bool(rs.random_sample() < space[name]["p_on"])
        if "method" in space:
            p["method"] = space["method"]["choices"][methods.randint(len(space["method"]["choices"]))]
        out.append(p)
    return out


def tune_space(space: dict) -> dict:
    """The same space in Ray Tune's distributions (for a model-based searcher such as TPE)."""
    from ray import tune

    out = {}
    for name in NUMERIC:
        d = space[name]
        out[name] = (tune.loguniform if d["log"] else tune.uniform)(d["low"], d["high"])
    for name in CHOICE:
        out[name] = tune.choice(space[name]["choices"])
    for name in SWITCHES:  # a model-based sampler learns the switch; p_on is the random sampler's prior
        out[name] = tune.choice([True, False])
    if "method" in space:
        out["method"] = tune.choice(space["method"]["choices"])
    return out


def to_preset(params: dict, steps: int, name: str = "search") -> Preset:
    """The Preset a sampled setting stands for: a regularizer that is off is 0, as in Table 1; a
    successor (method lucid or maco) is its preset at the sampled length."""
    method = params.get("method", "pixels")
    if method != "pixels":
        return replace(PRESETS[method], name=name,
                       steps=max(1, int(round(float(params["steps"]) * int(steps))))).validate()
    on = {k: bool(params[k]) for k in SWITCHES}
    p = Preset(
        name=name, decay=float(params["decay"]) if on["decay_on"] else 0.0,
        blur_radius=float(params["blur_radius"]) if on["blur_on"] else 0.0,
        blur_every=int(params["blur_every"]) if on["blur_on"] else 0,
        small_norm_pct=float(params["small_norm_pct"]) if on["norm_on"] else 0.0,
        small_contrib_pct=float(params["small_contrib_pct"]) if on["contrib_on"] else 0.0,
        lr_policy=str(params["lr_policy"]), lr=float(params["lr"]), max_lr=float(params["max_lr"]),
        desired_prog=float(params["desired_prog"]),
        steps=max(1, int(round(float(params["steps"]) * int(steps)))))
    return replace(p).validate()


def pattern(preset: Preset) -> tuple[bool, bool, bool, bool]:
    """Which of the four regularizers a setting uses (the paper's four settings differ in this)."""
    return (preset.decay > 0, preset.blur_radius > 0 and preset.blur_every > 0,
            preset.small_norm_pct > 0, preset.small_contrib_pct > 0)


def coordinates(space: dict, params: dict) -> np.ndarray:
    """A setting as a point in [0, 1]^k (log scale where the space is log; a regularizer that is
    off sits at 0 of its axis): the distance between two settings is measured here."""
    x = []
    for name in NUMERIC:
        d, v = space[name], float(params[name])
        lo, hi, v = ((math.log(d["low"]), math.log(d["high"]), math.log(max(v, 1e-300))) if d["log"]
                     else (d["low"], d["high"], v))
        x.append(min(1.0, max(0.0, (v - lo) / (hi - lo))))
    for name in CHOICE:
        ch = space[name]["choices"]
        x.append(ch.index(params[name]) / max(1, len(ch) - 1) if params[name] in ch else 0.5)
    for switch, fields in SWITCHES.items():
        if not params[switch]:
            for f in fields:
                if f in NUMERIC:
                    x[NUMERIC.index(f)] = 0.0
        x.append(float(bool(params[switch])))
    if "method" in space:
        ch = space["method"]["choices"]
        x.append(ch.index(params.get("method", "pixels")) / max(1, len(ch) - 1) if params.get("method") in ch else 0.5)
    return np.array(x)
