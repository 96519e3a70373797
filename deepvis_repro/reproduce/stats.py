"""The harness's statistics, shared by the harness, the settings search and the successors'
comparison: bootstrap confidence intervals over units, and paired tests over the same units.

Every function is deterministic (its resampling is seeded), so a report says the same thing on
every machine that computed the same measures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: The measures each record carries, and which direction is better for a claim.
MEASURES = {
    "activation": "higher",       # the unit's best value
    "total_variation": "lower",   # smoothness
    "hf_energy": "lower",         # share of high-frequency power
    "judge_rank": "lower",        # recognizability: rank of the unit's class by the judge
    "judge_top5": "higher",       # recognizability: the class in the judge's top 5 (0/1)
}


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n}


def bootstrap_ci(values, statistic=np.mean, level: float = 0.95, resamples: int = 4000,
                 seed: int = 0) -> Interval | None:
    """Percentile bootstrap interval of statistic(values) over resampled units; None for no values.
    With one value the interval is that value (no spread can be estimated)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return None
    est = float(statistic(v))
    if len(v) == 1:
        return Interval(est, est, est, 1)
    rs = np.random.RandomState(seed)
    idx = rs.randint(0, len(v), size=(resamples, len(v)))
    stats = statistic(v[idx], axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return Interval(est, float(lo), float(hi), len(v))


@dataclass(frozen=True)
class Paired:
    """a vs b over the same units: the median difference a - b with its bootstrap interval, the
    matched-pairs rank-biserial correlation (-1..1: the share of evidence that a > b minus that
    a < b, by signed ranks) and the two-sided Wilcoxon signed-rank p-value (None: fewer than two
    units differ)."""
    a: str
    b: str
    measure: str
    n: int
    median_difference: float
    low: float
    high: float
    rank_biserial: float
    p_value: float | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of differences d (zeros dropped, ties averaged)."""
    from scipy.stats import rankdata

    d = d[d != 0]
    if len(d) == 0:
        return 0.0
    r = rankdata(np.abs(d))
    return float((r[d > 0].sum() - r[d < 0].sum()) / r.sum())


def paired(a_name: str, a, b_name: str, b, measure: str, seed: int = 0) -> Paired | None:
    """Paired comparison of two settings' measure over the units both have a value for."""
    from scipy.stats import wilcoxon

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None
             and np.isfinite(x) and np.isfinite(y)]
    if not pairs:
        return None
    x, y = np.array(pairs, dtype=np.float64).T
    d = x - y
    ci = bootstrap_ci(d, np.median, seed=seed)
    p = None
    if np.count_nonzero(d) >= 2:
        p = float(wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue)
    return Paired(a_name, b_name, measure, len(d), float(np.median(d)), ci.low, ci.high,
                  rank_biserial(d), p)


def per_setting(records: list, seed: int = 0) -> dict:
    """{setting: {measure: Interval dict}} (mean over units; the judge rank's median)."""
    out = {}
    for s in dict.fromkeys(r["setting"] for r in records):
        rs = [r for r in records if r["setting"] == s]
        out[s] = {}
        for m in MEASURES:
            stat = np.median if m == "judge_rank" else np.mean
            ci = bootstrap_ci([_value(r, m) for r in rs], stat, seed=seed)
            out[s][m] = ci.as_dict() if ci else None
    return out


def _value(r: dict, measure: str):
    if measure == "judge_top5":
        return None if r.get("judge_rank") is None else float(r["judge_rank"] <= 5)
    return r.get(measure)


def by_unit(records: list, setting: str, measure: str, units: list) -> list:
    rows = {r["unit"]: _value(r, measure) for r in records if r["setting"] == setting}
    return [rows.get(u) for u in units]


def claim(records: list, baseline: str = "none", measure: str = "judge_rank", alpha: float = 0.05,
          seed: int = 0) -> dict:
    """The paper's claim as paired tests: each regularized setting vs the baseline (plain
    gradient ascent), and the best setting vs each other, on the judge's rank of the unit's class
    (lower is better). A setting 'beats' another where the test's p < alpha and the median
    difference favours it; otherwise the difference is 'not significant'."""
    settings = list(dict.fromkeys(r["setting"] for r in records))
    units = list(dict.fromkeys(r["unit"] for r in records if r.get(measure) is not None))
    better = MEASURES[measure]
    out = {"measure": measure, "baseline": baseline, "alpha": alpha, "units": len(units),
           "vs_baseline": [], "best": None, "best_vs_others": []}
    if not units:
        return out

    def verdict(p: Paired | None) -> str:
        if p is None or p.p_value is None or p.p_value >= alpha:
            return "not significant"
        wins = p.median_difference < 0 if better == "lower" else p.median_difference > 0
        if p.median_difference == 0:
            wins = p.rank_biserial < 0 if better == "lower" else p.rank_biserial > 0
        return "better" if wins else "worse"

    values = {s: by_unit(records, s, measure, units) for s in settings}
    if baseline in settings:
        for s in settings:
            if s != baseline:
                p = paired(s, values[s], baseline, values[baseline], measure, seed)
                out["vs_baseline"].append({**(p.as_dict() if p else {"a": s, "b": baseline}), "verdict": verdict(p)})
    # the best: by median, ties broken by the mean (paper_1 and paper_3 can both have median 1)
    score = {s: (np.median([v for v in values[s] if v is not None]), np.mean([v for v in values[s] if v is not None]))
             for s in settings if any(v is not None for v in values[s])}
    if score:
        best = min(score, key=score.get) if better == "lower" else max(score, key=score.get)
        out["best"] = best
        for s in settings:
            if s != best:
                p = paired(best, values[best], s, values[s], measure, seed)
                out["best_vs_others"].append({**(p.as_dict() if p else {"a": best, "b": s}), "verdict": verdict(p)})
    return out


def claim_line(c: dict) -> str | None:
    """One console line for the paper's claim, e.g. 'Paper's claim (regularized images are more
    recognizable than plain gradient ascent, judge rank, 8 units, Wilcoxon p < 0.05): holds for
    paper_1, paper_3; not significant for paper_2, paper_4'."""
    if not c["units"] or not c["vs_baseline"]:
        return None
    groups: dict[str, list[str]] = {}
    for row in c["vs_baseline"]:
        groups.setdefault(row["verdict"], []).append(row["a"])
    words = {"better": "holds for", "not significant": "not significant for", "worse": "reversed for"}
    parts = [f"{words[k]} {', '.join(groups[k])}" for k in ("better", "not significant", "worse") if k in groups]
    head = (f"Paper's claim (regularized images are more recognizable than plain gradient ascent; "
            f"judge rank over {c['units']} units, paired Wilcoxon, p < {c['alpha']:g})")
    return f"{head}: {'; '.join(parts)}"


def fmt_p(p) -> str:
    if p is None:
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.0e}"


def fmt_interval(ci: dict | None, digits: int = 2) -> str:
    if not ci:
        return "–"
    f = (lambda v: f"{v:.{digits}f}") if digits else (lambda v: f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}")
    if math.isclose(ci["low"], ci["high"]) and ci["n"] == 1:
        return f(ci["estimate"])
    return f"{f(ci['estimate'])} [{f(ci['low'])}, {f(ci['high'])}]"
