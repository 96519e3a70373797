"""deepvis-search: the sampler covers the space, the search finds a known optimum on Ray Tune,
the command writes its table and presets (usable by deepvis-optimize), and a killed search
continues without rerunning its finished trials."""
import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from deepvis_repro.errors import DeepvisError
from deepvis_repro.optimize import PRESETS, get_preset
from deepvis_repro.search.space import (CHOICE, NUMERIC, SWITCHES, check_space, coordinates, pattern,
                                        sample, to_preset)

QUICK = os.path.join(os.path.dirname(__file__), "..", "conf", "search", "quick.yaml")


@pytest.fixture(scope="module")
def space():
    return check_space(OmegaConf.to_container(OmegaConf.load(QUICK))["space"])


def test_random_sampler_covers_every_range_and_is_the_same_on_a_rerun(space):
    draws = sample(space, 400, seed=3)
    assert draws == sample(space, 400, seed=3) and draws != sample(space, 400, seed=4)
    for name in NUMERIC:
        d, v = space[name], np.array([p[name] for p in draws])
        lo, hi = (np.log(d["low"]), np.log(d["high"])) if d["log"] else (d["low"], d["high"])
        t = ((np.log(v) if d["log"] else v) - lo) / (hi - lo)
        assert t.min() >= 0 and t.max() <= 1, name
        assert t.min() < 0.02 and t.max() > 0.98, name        # both ends of the range are reached
        assert np.histogram(t, bins=4, range=(0, 1))[0].min() > 60, name  # and the middle, evenly
    for name in CHOICE:
        assert {p[name] for p in draws} == set(space[name]["choices"]), name
    for name in SWITCHES:
        on = np.mean([p[name] for p in draws])
        assert abs(on - space[name]["p_on"]) < 0.08, name
    # every one of the 16 on/off patterns of the four regularizers occurs, each a valid preset
    presets = [to_preset(p, 60) for p in draws]
    assert len({pattern(p) for p in presets}) == 16
    assert {p.steps for p in presets} == {30, 45, 60}


def test_the_successors_as_a_choice_in_the_space(space):
    """search.space.method: some trials run Lucid or MACO (at the sampled length); the Table 1
    draws are those of a space without the choice, so earlier searches keep their trials."""
    with_method = check_space({**space, "method": {"choices": ["pixels", "lucid", "maco"]}})
    a, b = sample(space, 60, seed=1), sample(with_method, 60, seed=1)
    assert [{k: v for k, v in p.items() if k != "method"} for p in b] == a
    presets = [to_preset(p, 60) for p in b]
    assert {p.param for p in presets} == {"pixels", "fourier", "maco"}
    lucid = next(p for p in presets if p.param == "fourier")
    assert lucid.transforms == "lucid" and lucid.lr_policy == "adam" and lucid.steps in (30, 45, 60)
    assert len(coordinates(with_method, b[0])) == len(coordinates(space, a[0])) + 1
    with pytest.raises(DeepvisError, match="search.space.method needs 'choices' among"):
        check_space({**space, "method": {"choices": ["deepdream"]}})


def test_a_regularizer_that_is_off_is_zero_as_in_table_1(space):
    p = sample(space, 1, seed=0)[0]
    p.update(decay_on=False, blur_on=True, norm_on=False, contrib_on=True, blur_radius=0.8, blur_every=4)
    pre = to_preset(p, 100)
    assert pre.decay == 0 and pre.small_norm_pct == 0 and pre.blur_radius == 0.8 and pre.blur_every == 4
    assert pattern(pre) == (False, True, False, True)
    c = coordinates(space, p)
    assert c.min() >= 0 and c.max() <= 1 and c[NUMERIC.index("decay")] == 0


def test_bad_spaces_are_one_line_errors(space):
    from deepvis_repro.errors import DeepvisError

    bad = {k: dict(v) for k, v in space.items()}
    bad["decay"] = {"low": 0.0, "high": 0.5, "log": True}
    with pytest.raises(DeepvisError, match="decay: need low < high"):
        check_space(bad)
    with pytest.raises(DeepvisError, match="missing: lr"):
        check_space({k: v for k, v in space.items() if k != "lr"})


def synthetic_score(params) -> float:
    """A known optimum: decay 1e-2 and blur radius 1.0 on, the two clipping regularizers off.
    A wrong switch costs 4, more than the value terms can (at most 1 each): the best sampled
    setting with the right switches is the best of all."""
    p = to_preset(params, 30)
    wrong = sum(a != b for a, b in zip(pattern(p), (True, True, False, False)))
    near_decay = min(1.0, (math.log10(p.decay) + 2) ** 2 / 4) if p.decay > 0 else 1.0
    near_blur = min(1.0, 4 * (p.blur_radius - 1) ** 2) if p.blur_radius > 0 else 1.0
    return -4.0 * wrong - near_decay - near_blur


class Synthetic:
    """Reports like a real trial, at steps 10, 20, 30; a worse setting is behind at every step."""

    def __call__(self, params, report):
        score = synthetic_score(params)
        for s in (10, 20, 30):
            report({"score": score * (1 + (30 - s) / 30), "step": s, "finished": s == 30, "seconds": 0.0,
                    "units": "[]", "relative_activation": -score, "recognizability": score})


def test_search_on_ray_tune_finds_a_known_optimum_and_stops_hopeless_trials(ray_session, space, tmp_path):
    from deepvis_repro.search.select import choose_best
    from deepvis_repro.search.tuning import run_search

    ledger = run_search(Synthetic(), space, folder=str(tmp_path / "random"), trials=48, base_steps=30,
                        sampler="random", seed=1, cpus_per_trial=2, progress=False,
                        asha={"grace_steps": 10, "reduction_factor": 2})
    rows = ledger.rows
    assert sorted(int(r["trial"]) for r in rows) == list(range(48))
    assert any(r["status"] == "stopped early" and r["steps_run"] < 30 for r in rows)  # ASHA stopped some
    # the search's best is the best of the 48 settings it drew (early stopping never lost it) ...
    drawn = sample(space, 48, seed=1)
    truth = max(range(48), key=lambda i: synthetic_score(drawn[i]))
    best = max((r for r in rows if r["status"] == "finished"), key=lambda r: r["score"])
    assert best["trial"] == truth and best["score"] == pytest.approx(synthetic_score(drawn[truth]))
    # ... and it is the optimum's kind of setting, near its values
    assert (best["decay"] > 0, best["blur_radius"] > 0, best["small_norm_pct"] > 0,
            best["small_contrib_pct"] > 0) == (True, True, False, False)
    assert best["score"] > -1.0
    # the kept four differ in which regularizers they use, as the paper's four do
    kept = choose_best(rows, space, 30)
    assert len(kept) == 4 and kept[0] is best
    assert len({pattern(to_preset(r["params"], 30)) for r in kept}) == 4
    csv = (tmp_path / "random" / "trials.csv").read_text().splitlines()
    assert len(csv) == 49 and all(k in csv[0] for k in ("decay", "blur", "norm", "contrib", "judge_rank"))


def test_model_based_sampler_continues_a_search_from_its_ledger(ray_session, space, tmp_path):
    pytest.importorskip("optuna")
    from deepvis_repro.search.tuning import run_search

    folder = str(tmp_path / "tpe")
    first = run_search(Synthetic(), space, folder=folder, trials=20, base_steps=30, sampler="tpe", seed=2,
                       cpus_per_trial=2, progress=False).rows
    assert sorted(r["trial"] for r in first) == list(range(20))
    more = run_search(Synthetic(), space, folder=folder, trials=40, base_steps=30, sampler="tpe", seed=2,
                      cpus_per_trial=2, progress=False).rows
    assert more[:20] == first and sorted(r["trial"] for r in more) == list(range(40))
    # a run resumed inside the random start draws new settings, not the first run's again under new
    # numbers (issue 34: best_1..4 were two settings twice)
    early = os.path.join(folder, "early")
    start = run_search(Synthetic(), space, folder=early, trials=4, base_steps=30, sampler="tpe", seed=2,
                       cpus_per_trial=2, progress=False).rows
    resumed = run_search(Synthetic(), space, folder=early, trials=8, base_steps=30, sampler="tpe", seed=2,
                         cpus_per_trial=2, progress=False).rows
    key = lambda r: json.dumps(r["params"], sort_keys=True)  # noqa: E731
    assert len({key(r) for r in resumed}) == 8 and {key(r) for r in start} <= {key(r) for r in resumed}
    # told the first 20 scores, it samples better settings than its random start did
    assert np.median([r["score"] for r in more[20:]]) > np.median([r["score"] for r in first[:16]])


def search(*args, timeout=600):
    return subprocess.run(["deepvis-search", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("search_corpus")
    for name, img in photos.items():
        Image.fromarray(img).save(d / f"{name}.png")
    return d


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_search_command_writes_table_and_presets_and_a_killed_search_continues(tmp_path, small_corpus):
    pytest.importorskip("ray.tune")
    out = tmp_path / "search"
    common = ["search.steps=6", "search.report_every=3", "search.asha=null", "search.validate=false",
              "search.units=[fc:130,fc:366,blocks.9:3]", f"search.corpus={small_corpus}",
              f"search.dir={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    r = search("search.trials=3", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "trials.csv").read_text().splitlines()
    header = table[0].split(",")
    assert len(table) == 4
    for word in ("decay", "blur", "norm", "contrib", "judge_rank"):
        assert any(word in c for c in header), word
    rows = _rows(out / "trials.jsonl")
    assert all(r["judge_rank_median"] >= 1 and r["units"][2]["feature_agreement"] is not None for r in rows)
    assert sorted(p.name for p in out.glob("best_*.yaml")) == ["best_1.yaml", "best_2.yaml", "best_3.yaml"]
    best = get_preset(str(out / "best_1.yaml"))
    assert best.name == "best_1" and best.steps <= 6
    prov = OmegaConf.load(out / "best_1.yaml").provenance
    assert prov.backend == "efficientnet_lite0" and prov.judge == "efficientnet_lite1" and prov.trials == 3
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "panel.npz").exists()
    assert (out / "pareto.csv").read_text().startswith("trial,relative_activation,recognizability")

    # the preset on another command: deepvis-optimize regularization=FILE
    o = subprocess.run(["deepvis-optimize", f"regularization={out / 'best_1.yaml'}", "unit=fc:130",
                        "optimize.steps=2", f"hydra.run.dir={tmp_path / 'opt'}"], capture_output=True, text=True)
    assert o.returncode == 0, o.stderr
    rec = json.loads((tmp_path / "opt" / "results.json").read_text())
    assert rec["preset"]["name"] == "best_1" and rec["preset"]["lr_policy"] == best.lr_policy

    # extend to 6 trials, SIGKILL the driver once a fourth trial is in the ledger, and rerun
    before = _rows(out / "trials.jsonl")
    before_csv = (out / "trials.csv").read_text().splitlines()
    p = subprocess.Popen(["deepvis-search", "search.trials=6", *common], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_rows(out / "trials.jsonl")) < 4 and p.poll() is None:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed = _rows(out / "trials.jsonl")
    assert 4 <= len(killed) <= 6 and killed[:3] == before
    r = search("search.trials=6", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    after = _rows(out / "trials.jsonl")
    assert after[:len(killed)] == killed and sorted(x["trial"] for x in after) == list(range(6))
    ran = {int(line.split(":")[0].split()[1]) for line in r.stdout.splitlines() if line.startswith("trial ")}
    assert ran == set(range(len(killed), 6))  # no finished trial ran again
    after_csv = (out / "trials.csv").read_text().splitlines()
    assert len(after_csv) == 7 and after_csv[:4] == before_csv  # the finished rows, unchanged


def test_another_search_in_the_same_folder_is_refused(tmp_path):
    from deepvis_repro.errors import DeepvisError
    from deepvis_repro.search.tuning import check_identity

    check_identity(str(tmp_path), {"units": ["fc:1"], "seed": 0})
    check_identity(str(tmp_path), {"units": ["fc:1"], "seed": 0})  # the same search continues
    with pytest.raises(DeepvisError, match="holds another search .*units differ"):
        check_identity(str(tmp_path), {"units": ["fc:2"], "seed": 0})
    # issue 34: search.json deleted, a rerun with other units adopted the old rows and panel
    (tmp_path / "trials.jsonl").write_text("")
    (tmp_path / "search.json").unlink()
    with pytest.raises(DeepvisError, match="holds trials.jsonl but no search.json"):
        check_identity(str(tmp_path), {"units": ["fc:2"], "seed": 0})


def test_holdout_leaves_out_the_search_units_and_gives_the_paper_the_same_budget(lite0):
    from deepvis_repro.search.holdout import holdout_profile

    prof = holdout_profile(lite0, {"classes": [130, 144, 366], "hidden": [[0.5, 10]]}, ["fc:130", "blocks.9:3"],
                           40, ["x/best_1.yaml"])
    assert prof["classes"] == [144, 366] and prof["hidden"] == [[0.5, 10]]
    paper = [get_preset(s) for s in prof["settings"][:5]]
    assert [p.name for p in paper] == ["paper_1", "paper_2", "paper_3", "paper_4", "none"]
    assert all(p.steps == 40 for p in paper) and paper[2].blur_radius == PRESETS["paper_3"].blur_radius
    assert prof["settings"][5] == "x/best_1.yaml"


def test_command_line_mistakes_are_one_line(tmp_path):
    for args, msg in ((["search.trials=0"], "search.trials"), (["search.sampler=grid"], "search.sampler must be"),
                      (["search.units=[]"], "search.units names no units"),
                      (["search.units=[fc:5000]"], "channel 5000 out of range")):
        r = search(*args, f"search.dir={tmp_path / 'x'}", f"hydra.run.dir={tmp_path / 'run'}")
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
