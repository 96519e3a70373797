"""The harness's statistics against scipy on small synthetic cases, the claim's verdicts, and how
an image is compared with its reference (identical, a rounding twin, a real difference)."""
import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps

from deepvis_repro.reproduce import stats
from deepvis_repro.reproduce.compare import compare, verdict
from deepvis_repro.reproduce.harness import Run


def test_bootstrap_interval_matches_scipys():
    x = np.random.default_rng(0).lognormal(size=40)
    ours = stats.bootstrap_ci(x, np.mean, resamples=20000)
    theirs = sps.bootstrap((x,), np.mean, method="percentile", n_resamples=20000, random_state=1).confidence_interval
    spread = theirs.high - theirs.low
    assert ours.estimate == pytest.approx(x.mean())
    assert abs(ours.low - theirs.low) < 0.05 * spread and abs(ours.high - theirs.high) < 0.05 * spread
    assert stats.bootstrap_ci([3.0], np.mean).as_dict() == {"estimate": 3.0, "low": 3.0, "high": 3.0, "n": 1}
    assert stats.bootstrap_ci([None], np.mean) is None


def test_paired_test_matches_scipys_wilcoxon():
    rng = np.random.default_rng(2)
    a = rng.normal(size=12)
    b = a + rng.normal(0.8, 1.0, size=12)
    p = stats.paired("a", list(a), "b", list(b), "judge_rank")
    assert p.p_value == pytest.approx(sps.wilcoxon(a, b).pvalue)
    assert p.median_difference == pytest.approx(np.median(a - b))
    assert p.low <= p.median_difference <= p.high
    # rank-biserial by hand: (sum of ranks of positive d - of negative d) / all ranks
    d = a - b
    r = sps.rankdata(np.abs(d))
    assert p.rank_biserial == pytest.approx((r[d > 0].sum() - r[d < 0].sum()) / r.sum())
    assert stats.paired("a", [1.0], "b", [1.0], "x").p_value is None  # nothing differs: no test


def records(ranks: dict) -> list:
    return [{"setting": s, "unit": f"fc:{i}", "judge_rank": v, "activation": 1.0, "total_variation": 0.1,
             "hf_energy": 0.5} for s, vs in ranks.items() for i, v in enumerate(vs)]


def test_claim_verdicts():
    rng = np.random.default_rng(3)
    base = list(rng.integers(50, 500, size=8).astype(float))
    rs = records({"good": [1, 2, 1, 3, 1, 1, 2, 4], "noise": list(rng.permutation(base)), "none": base})
    c = stats.claim(rs)
    v = {t["a"]: t for t in c["vs_baseline"]}
    assert v["good"]["verdict"] == "better" and v["good"]["p_value"] == pytest.approx(2 / 2 ** 8)
    assert v["noise"]["verdict"] in ("not significant", "better", "worse")
    assert v["noise"]["p_value"] == pytest.approx(sps.wilcoxon(
        stats.by_unit(rs, "noise", "judge_rank", [f"fc:{i}" for i in range(8)]), base).pvalue)
    assert c["best"] == "good"
    line = stats.claim_line(c)
    assert "claim" in line and "holds for good" in line
    two = stats.claim(records({"good": [1, 1], "none": [400, 300]}))
    assert two["vs_baseline"][0]["verdict"] == "not significant"  # 2 units can never reach p < 0.05
    assert "not significant for good" in stats.claim_line(two)


def test_compare_statuses(tmp_path):
    rng = np.random.default_rng(4)
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    other = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    twin = img.copy()
    twin[10, 10] = 255 - twin[10, 10]  # one pixel of rounding
    run = Run()
    for u, im in (("same", img), ("twin", twin), ("changed", other), ("missing", img), ("damaged", img)):
        run.images[("s", u)] = im
        run.records.append({"setting": "s", "unit": u, "image": f"images/s__{u}.png"})
    for u in ("same", "twin", "changed"):
        Image.fromarray(img).save(tmp_path / f"s__{u}.png")
    (tmp_path / "s__damaged.png").write_bytes(b"not a png")
    failures = compare(run, tmp_path, 0.75)
    got = {r["unit"]: (r["reference"], r["comparison"]) for r in run.records}
    assert got == {"same": ("match", "identical"), "twin": ("match", "rounding criterion"),
                   "changed": ("differs", "rounding criterion"), "missing": ("missing", None),
                   "damaged": ("damaged", None)}
    assert {r["unit"] for r in failures} == {"changed", "damaged", "missing"}  # exit 0: every image matched
    assert verdict(run.records, 0.75) == ("References: 2/5 images match (1 identical, 1 rounding twin); "
                                          "1 without a reference")


def test_the_rounding_criterion_reads_the_first_steps(tmp_path):
    """Where bits differ, a twin is judged by its first objective values (trajectories.json): a
    rounding-sized difference passes, a changed setting's does not, nor a wrong length; and a
    setting whose images all move a little (each within one image's tolerance) fails as a whole."""
    import json

    from deepvis_repro.reproduce.compare import trajectory_difference

    rng = np.random.default_rng(5)
    ref_hist = list(np.cumsum(rng.random(20)) * 3.0)
    img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    run = Run()
    cases = {("s", "twin"): [v * (1 + 1e-6) for v in ref_hist], ("s", "twin2"): ref_hist,
             ("s", "changed"): [v * 1.2 for v in ref_hist], ("s", "shorter"): ref_hist}
    cases.update({("t", f"u{i}"): [v * 1.02 for v in ref_hist] for i in range(3)})  # all 2% off
    for (setting, u), hist in cases.items():
        other = img.copy()
        other[0, 0] ^= 1  # not identical
        run.images[(setting, u)] = other
        run.records.append({"setting": setting, "unit": u, "image": f"images/{setting}__{u}.png", "history": hist,
                            "steps": 20 if u != "shorter" else 10})
        Image.fromarray(img).save(tmp_path / f"{setting}__{u}.png")
    (tmp_path / "trajectories.json").write_text(json.dumps(
        {f"{s}__{u}.png": {"steps": 20, "history": ref_hist[:4]} for s, u in cases}))
    compare(run, tmp_path, 0.75, tolerance=0.05, median_tolerance=0.005)
    got = {(r["setting"], r["unit"]): r["reference"] for r in run.records}
    assert got == {("s", "twin"): "match", ("s", "twin2"): "match", ("s", "changed"): "differs",
                   ("s", "shorter"): "differs", ("t", "u0"): "differs", ("t", "u1"): "differs", ("t", "u2"): "differs"}
    assert trajectory_difference([1.0, 2.0], [1.0]) == 0.0 and trajectory_difference([1.0], [1.0, 2.0]) == float("inf")
