"""Faults, round three (issue 34), the search and the rest: one search per folder, a resumed
model-based search that draws new settings, failed trials that are failures (not interruptions),
a space or a cluster no trial could run with said up front, hand-edited ledgers and profiles,
a Ctrl-C while the commands load, no empty run folders, and bfloat16 only where it is native."""
import json
import os
import re
import signal
import subprocess
import time

import pytest
from omegaconf import OmegaConf

from deepvis_repro.errors import DeepvisError
from deepvis_repro.files import folder_lock
from deepvis_repro.search.space import check_space

ENV = dict(os.environ, SDL_VIDEODRIVER="dummy")
QUICK = os.path.join(os.path.dirname(__file__), "..", "conf", "search", "quick.yaml")


def run(*args, timeout=600, env=None, **kw):
    return subprocess.run(list(args), capture_output=True, text=True, env=env or ENV, timeout=timeout, **kw)


def one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def space():
    return OmegaConf.to_container(OmegaConf.load(QUICK))["space"]


@pytest.mark.parametrize("name, value, message", [
    ("blur_every", {"choices": [-1]}, "blur_every: whole numbers of steps >= 1, got -1"),
    ("blur_every", {"choices": [2.5]}, "blur_every: whole numbers of steps >= 1, got 2.5"),
    ("decay", {"low": 0.1, "high": 5}, "search.space.decay: a trial drawing 5.0 could not run: decay must be in"),
    ("decay", {"low": 2, "high": 5}, "low ends could not run: decay must be in [0, 1]"),
    ("lr", {"low": -1, "high": 5}, "low ends could not run: lr must be a positive number"),
    ("steps", {"choices": ["abc"]}, "steps.choices must be a number, got 'abc'"),
    ("blur_on", {"p_on": "abc"}, "blur_on.p_on must be a number, got 'abc'"),
    ("decay", 5, "decay must be a mapping with low and high, got 5"),
    ("decay", {"low": 1e-5, "high": 0.5, "log": "yes"}, "decay.log must be true or false"),
    ("method", {"choices": ["pixels", "dream"]}, "unknown: dream"),
])
def test_a_space_no_trial_could_run_with_is_one_line(space, name, value, message):
    """Issue 34 item 5/7: these passed the up-front check and then failed inside every trial."""
    with pytest.raises(DeepvisError, match=re.escape(message)):
        check_space({**space, name: value})


def test_the_method_is_in_the_space_and_pixels_alone_is_table_1(space):
    """search.space.method is in the config (settable from the command line); pixels alone is
    Table 1's space, with the same identity (a folder searched before still continues)."""
    assert space["method"] == {"choices": ["pixels"]}
    table1 = check_space(space)
    assert "method" not in table1
    assert table1 == check_space({k: v for k, v in space.items() if k != "method"})
    assert check_space({**space, "method": {"choices": ["pixels", "maco"]}})["method"] == {"choices": ["pixels", "maco"]}


def search(tmp_path, *args, timeout=600):
    return run("deepvis-search", *args, f"hydra.run.dir={tmp_path / 'run'}", timeout=timeout, cwd=tmp_path)


def test_search_command_line_faults_are_one_line_before_any_work(tmp_path):
    cases = [
        (["search.space.steps.choices=[abc]"], "search.space.steps.choices must be a number, got 'abc'"),
        (["search.space.blur_on.p_on=abc"], "search.space.blur_on.p_on must be a number"),
        (["search.space.decay=5"], "search.space.decay must be a mapping"),
        (["search.space.blur_every.choices=[-1]"], "blur_every: whole numbers of steps >= 1"),
        (["engine.address=127.0.0.1:1"], "cannot reach the Ray cluster at engine.address=127.0.0.1:1"),
        (["engine.address=ray://127.0.0.1:1"], "cannot reach the Ray cluster at engine.address=ray://127.0.0.1:1"),
        # the method is settable from the command line: this run gets past the space to the unit
        (["search.space.method.choices=[pixels,lucid]", "search.units=[fc:5000]"], "channel 5000 out of range"),
        (["search.holdout.classes=[5000]"], "search.holdout: classes: class 5000 out of range"),
        (["search.holdout.classes=[abc]"], "search.holdout.classes entry must be a whole number"),
    ]
    for args, message in cases:
        t0 = time.perf_counter()
        r = search(tmp_path, *args, f"search.dir={tmp_path / 's'}", timeout=120)
        assert r.returncode == 2 and message in one_line(r), (args, r.stderr)
        assert time.perf_counter() - t0 < 60, args  # said up front, not after trials ran
        assert not (tmp_path / "s" / "trials.jsonl").exists()


def test_two_searches_in_one_folder_refused(tmp_path):
    """Issue 34 item 5: two at once both exited 0 with a ledger of [0,0,1,2,1,2,3,3]."""
    folder = tmp_path / "s"
    with folder_lock(str(folder), "search.dir", "wait"):
        r = search(tmp_path, f"search.dir={folder}", "search.trials=1", timeout=120)
    assert r.returncode == 2
    assert f"search.dir {folder} is in use by another run (process {os.getpid()})" in one_line(r)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing written by the refused run


def test_hand_edited_ledgers_are_one_line(tmp_path):
    from deepvis_repro.search.tuning import Ledger

    good = {"trial": 0, "status": "finished", "steps_run": 6, "seconds": 1.0, "params": {"decay": 0.1},
            "score": 0.5}
    cases = {
        "wrong types": json.dumps({**good, "trial": "abc"}) + "\n" + json.dumps(good) + "\n",
        "a score that is a string": json.dumps({**good, "score": "high"}) + "\n",
        "not UTF-8": json.dumps(good) + "\n" + '{"trial": 1, "status": "\udcff"}'.encode(
            "utf-8", "surrogateescape").decode("latin-1") + "\n" + json.dumps({**good, "trial": 2}) + "\n",
    }
    for what, text in cases.items():
        d = tmp_path / what.replace(" ", "_")
        d.mkdir()
        (d / "trials.jsonl").write_bytes(text.encode("latin-1") if what == "not UTF-8" else text.encode())
        with pytest.raises(DeepvisError, match="line [12] is not a"):
            Ledger(str(d))
    d = tmp_path / "folder"
    (d / "trials.jsonl").mkdir(parents=True)
    with pytest.raises(DeepvisError, match="trials.jsonl is not a file"):
        Ledger(str(d))
    # a torn last line (a kill mid-write) is not a fault: that trial runs again
    d = tmp_path / "torn"
    d.mkdir()
    (d / "trials.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "trial": 1})[:20])
    assert [r["trial"] for r in Ledger(str(d)).rows] == [0]


class Failing:
    """A trial objective that fails for every setting with blur on, as a broken setting would."""

    def __call__(self, params, report):
        if params["blur_on"]:
            raise ValueError("blur exploded")
        report({"score": 1.0, "step": 30, "finished": True, "seconds": 0.0, "units": "[]",
                "relative_activation": 1.0, "recognizability": 1.0})


def test_failed_trials_are_a_failure_not_an_interruption(ray_session, space, tmp_path):
    """Issue 34 item 5: every trial died inside Ray, then 'interrupted, rerun' with exit 0."""
    from deepvis_repro.search.tuning import Ledger, run_search

    with pytest.raises(DeepvisError, match=r"trial\(s\) failed \(trial \d+ failed: .*blur exploded"):
        run_search(Failing(), check_space(space), folder=str(tmp_path), trials=6, base_steps=30, seed=0,
                   cpus_per_trial=2, progress=False)
    rows = Ledger(str(tmp_path)).rows  # the trials that finished are kept
    assert rows and all(not r["params"]["blur_on"] for r in rows)


def test_a_trial_the_cluster_cannot_hold_is_refused(ray_session, space, tmp_path):
    """Issue 34 item 6: cpus_per_trial=100 or a GPU on a machine without one never scheduled a trial."""
    from deepvis_repro.search.tuning import run_search

    for kw, message in (({"cpus_per_trial": 100}, "engine.cpus_per_trial=100, but the Ray cluster has 2 CPUs"),
                        ({"gpus_per_trial": 1}, "engine.gpus_per_trial=1, but the Ray cluster has 0 GPUs")):
        t0 = time.perf_counter()
        with pytest.raises(DeepvisError, match=message):
            run_search(Failing(), check_space(space), folder=str(tmp_path), trials=2, base_steps=30,
                       progress=False, **{"cpus_per_trial": 1, **kw})
        assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("profile, message", [
    (["profile.classes=[5000]"], "profile.classes: class 5000 out of range (fc has 1000 classes"),
    (["profile.hidden=[[2.0,10]]"], "depth fraction must be in [0, 1]"),
    (["profile.hidden=[[0.5,99999]]"], "profile.hidden: channel 99999 out of range for blocks."),
    (["profile=successors", "profile.hidden=[abc]"], "profile.hidden entries are [depth fraction, channel]"),
    (["profile.classes=[abc]"], "profile.classes entry must be a whole number, got 'abc'"),
])
def test_profile_units_are_the_units_named(tmp_path, profile, message):
    """Issue 34 item 10: a class dropped, a fraction clamped, a channel wrapped, without a word."""
    r = run("deepvis-reproduce", *profile, "references=none", "judge=null", f"hydra.run.dir={tmp_path / 'r'}",
            timeout=120)
    assert r.returncode == 2 and message in one_line(r), r.stderr
    assert not (tmp_path / "r").exists()


def test_mine_checkpoint_seconds_typo_is_one_line(tmp_path):
    r = run("deepvis-mine", "checkpoint_seconds=abc", f"atlas.dir={tmp_path / 'a'}", timeout=120)
    assert r.returncode == 2 and "checkpoint_seconds must be a number, got 'abc'" in one_line(r)


def test_ctrl_c_while_the_command_loads_is_one_line(tmp_path):
    """Issue 34 item 12: a Ctrl-C in the first seconds printed a 40-line KeyboardInterrupt traceback.
    The signal is sent once torch's library is mapped into the process: mid-import, by event."""
    p = subprocess.Popen(["deepvis-inspect"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ENV, cwd=tmp_path)
    deadline = time.time() + 60
    maps = f"/proc/{p.pid}/maps"
    while time.time() < deadline and p.poll() is None:
        try:
            with open(maps) as f:
                if "libtorch" in f.read():
                    break
        except OSError:
            pass
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err == "deepvis-inspect: interrupted\n" and "Traceback" not in err


def test_failed_commands_leave_no_empty_run_folders(tmp_path):
    """Issue 34 item 12: every early failure left an empty outputs/<date>/ behind."""
    for args in (["deepvis-optimize", "unit=fc:5000"], ["deepvis-reproduce", "profile.classes=[5000]"],
                 ["deepvis-search", "search.units=[fc:5000]", f"search.dir={tmp_path / 's'}"]):
        r = run(*args, timeout=120, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert not (tmp_path / "outputs").exists(), (args, list((tmp_path / "outputs").rglob("*")))


def test_bf16_without_native_support_runs_float32_and_says_so(tmp_path):
    """Issue 34 item 13: emulated bfloat16 made a user wait 18x with a warning that said 'slower'."""
    from deepvis_repro.bf16 import native_bf16

    if native_bf16("cpu"):
        pytest.skip("this CPU has native bfloat16: nothing to fall back from")
    env = {k: v for k, v in ENV.items() if k != "DEEPVIS_BF16_EMULATE"}
    r = run("deepvis-optimize", "unit=fc:130", "optimize.steps=2", "optimize.numerics=bf16",
            f"hydra.run.dir={tmp_path / 'o'}", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    note = [l for l in r.stderr.splitlines() if "bf16" in l]
    assert len(note) == 1 and "about 18x slower than float32, so this run computes in float32" in note[0]
    rec = json.loads((tmp_path / "o" / "results.json").read_text())
    assert rec["numerics"]["mode"] == "default" and rec["numerics"]["asked"] == "bf16"


def test_sigterm_ends_a_search_with_143_and_its_best_settings(tmp_path, photos):
    """Issue 34 item 6: ray.init's own SIGTERM handler dumped a stack and died (status 134), with
    no summary and no best files. Sent once the first trial is in the ledger."""
    pytest.importorskip("ray.tune")
    from PIL import Image

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(photos[name]).save(corpus / f"{name}.png")
    out = tmp_path / "s"
    p = subprocess.Popen(["deepvis-search", "search.trials=4", "search.steps=4", "search.report_every=2",
                          "search.asha=null", "search.validate=false", "search.units=[fc:130]",
                          f"search.corpus={corpus}", f"search.dir={out}", f"hydra.run.dir={tmp_path / 'run'}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    ledger = out / "trials.jsonl"
    while time.time() < deadline and p.poll() is None and not (ledger.exists() and ledger.read_text().strip()):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr[-2000:]
    assert "SIGTERM received" not in stderr and stderr.strip().endswith("deepvis-search: error: terminated")
    assert "rerun the same command to continue" in stderr
    assert (out / "best_1.yaml").exists() and json.loads((out / "summary.json").read_text())["trials"] >= 1
