"""Faults, round three (issue 34): a setting's name that would write anywhere, a YAML alias bomb,
references replaced by a subset, and a harness whose exit 0 means every image matched by the
criterion that applies."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepvis_repro.errors import DeepvisError
from deepvis_repro.optvis.presets import preset_from_file
from deepvis_repro.reproduce.compare import compare, verdict
from deepvis_repro.reproduce.harness import Run

ENV = dict(os.environ, SDL_VIDEODRIVER="dummy")
REFS = Path(__file__).resolve().parents[1] / "reference_outputs" / "efficientnet_lite0" / "quick"
#: one class unit, two steps: a harness run of seconds
TINY = ["profile.steps=2", "profile.classes=[130]", "profile.hidden=[]", "judge=null"]

#: the 491-byte "billion laughs" of YAML: nine levels of nine aliases, 9^9 values once expanded
BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def run(*args, timeout=600, **kw):
    return subprocess.run(list(args), capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


def one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_setting_name_cannot_write_outside_the_run_folder(tmp_path):
    evil = tmp_path / "elsewhere"
    evil.mkdir()
    setting = tmp_path / "s.yaml"
    setting.write_text(f"name: ../../../../../../../../{evil}/X\ndecay: 0.0001\nblur_radius: 1.0\nblur_every: 4\n")
    for args in (["deepvis-reproduce", f"profile.settings=[{setting}]", "references=none", *TINY],
                 ["deepvis-optimize", f"regularization={setting}", "optimize.steps=2"]):
        r = run(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "cannot name output files" in one_line(r)
        assert not list(evil.iterdir()) and not list(tmp_path.rglob("X__*"))
    # a file's own name is made safe instead (the user did not write a name)
    odd = tmp_path / "my setting, v2.yaml"
    odd.write_text("decay: 0.0001\nblur_radius: 1.0\nblur_every: 4\n")
    assert preset_from_file(str(odd)).name == "my-setting--v2"
    # and a comma in the path is no Hydra grammar error
    r = run("deepvis-optimize", f"regularization={odd}", "optimize.steps=2", f"hydra.run.dir={tmp_path / 'ok'}")
    assert r.returncode == 0, r.stderr


def test_a_setting_named_like_a_builtin_must_be_it(tmp_path):
    f = tmp_path / "fake.yaml"
    f.write_text("name: paper_3\ndecay: 0.3\n")
    with pytest.raises(DeepvisError, match="named 'paper_3' like the built-in setting"):
        preset_from_file(str(f))
    f.write_text("name: paper_3\ndecay: 0.0001\nblur_radius: 1.0\nblur_every: 4\n")
    assert preset_from_file(str(f)).name == "paper_3"  # the same setting, written out


def test_a_yaml_alias_bomb_is_refused_within_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB.encode()) < 600
    # in a process allowed 512 MB more than its imports took: the bomb's expansion would need far more
    code = ("import resource, sys\nfrom deepvis_repro.files import load_yaml_file\n"
            "vm = int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmSize')][0]) * 1024\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), vm + (512 << 20)))\n"
            "try:\n    load_yaml_file(sys.argv[1], 'setting file')\n"
            "except Exception as e:\n    print(type(e).__name__, e); sys.exit(3)")
    r = run(sys.executable, "-c", code, str(bomb), timeout=60)
    assert r.returncode == 3 and "DeepvisError" in r.stdout and "expands to more than" in r.stdout, r
    # the command: one line, exit 2, in seconds
    r = run("deepvis-optimize", f"regularization={bomb}", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert r.returncode == 2 and "expands to more than" in one_line(r)
    big = tmp_path / "big.yaml"
    big.write_text("name: " + "x" * 200_000 + "\n")
    with pytest.raises(DeepvisError, match="bytes; a setting file holds at most"):
        preset_from_file(str(big))
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(DeepvisError):
        preset_from_file(str(deep))


def test_references_are_not_replaced_by_a_subset(tmp_path):
    refs = tmp_path / "refs"
    shutil.copytree(REFS, refs)
    before = sorted(p.name for p in refs.iterdir())
    r = run("deepvis-reproduce", f"references={refs}", "update_references=true",
            "profile.settings=[paper_3,none]", f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    assert r.returncode == 2, r.stderr
    line = one_line(r)
    assert "would drop 27 of the 45 references" in line and "drop_references=true" in line
    assert sorted(p.name for p in refs.iterdir()) == before
    assert not (tmp_path / "run" / "images").exists()  # refused before any work


def test_exit_zero_means_every_image_matched(tmp_path):
    refs = tmp_path / "refs"
    args = ["deepvis-reproduce", "profile.settings=[paper_3]", *TINY]
    # no reference folder at all: not a pass
    r = run(*args, f"references={refs}", f"hydra.run.dir={tmp_path / 'a'}")
    assert r.returncode == 1 and "no such folder" in r.stderr, r.stderr
    assert "References: 0/1 images match; 1 without a reference" in r.stdout
    # only measuring is said as such, and passes
    r = run(*args, "references=none", f"hydra.run.dir={tmp_path / 'b'}")
    assert r.returncode == 0 and "References: not compared" in r.stdout, r.stderr
    # made, then compared: identical
    r = run(*args, f"references={refs}", "update_references=true", f"hydra.run.dir={tmp_path / 'c'}")
    assert r.returncode == 0, r.stderr
    r = run(*args, f"references={refs}", f"hydra.run.dir={tmp_path / 'd'}")
    assert r.returncode == 0 and "1/1 images match (1 identical)" in r.stdout, r.stderr
    # one bit of one pixel changed, both sides portable: bits are the criterion, not rounding twins
    png = refs / "paper_3__fc_130.png"
    a = np.asarray(Image.open(png)).copy()
    a[100, 100, 0] ^= 1
    Image.fromarray(a).save(png)
    r = run(*args, f"references={refs}", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.returncode == 1 and "not identical (both in portable numerics)" in r.stderr, r.stderr
    # a reference replaced by a decompression bomb is damaged, not a traceback
    Image.new("L", (5000, 5000)).save(png)
    r = run(*args, f"references={refs}", f"hydra.run.dir={tmp_path / 'f'}")
    assert r.returncode == 1 and "damaged reference" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # trajectories of strings: a difference, never a traceback; the run's images are kept
    (refs / "trajectories.json").write_text(json.dumps({"paper_3__fc_130.png": {"steps": 2, "history": ["a", "b"]}}))
    r = run(*args, f"references={refs}", f"hydra.run.dir={tmp_path / 'g'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "g" / "images" / "paper_3__fc_130.png").is_file()


def test_an_image_cut_short_never_matches(tmp_path):
    """An image stopped by a signal at step 6 of 60 starts on its reference's trajectory: it is
    reported as cut short, not as a rounding twin."""
    img = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(img + 1).save(tmp_path / "paper_3__fc_130.png")
    (tmp_path / "trajectories.json").write_text(json.dumps({"paper_3__fc_130.png": {"steps": 60, "history": [1.0, 2.0]}}))
    rec = {"setting": "paper_3", "unit": "fc:130", "image": "images/paper_3__fc_130.png", "steps": 60,
           "steps_run": 6, "partial": True, "history": [1.0, 2.0], "reference": "missing", "ssim": None}
    run_ = Run(records=[rec], images={("paper_3", "fc:130"): img})
    failures = compare(run_, tmp_path, bits_expected=False)
    assert failures == [rec] and rec["reference"] == "partial"
    assert verdict([rec], 0.75) == "References: 0/1 images match; 1 cut short"
