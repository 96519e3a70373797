"""The reproduction harness: metrics on hand-made images, the quick profile against its stored
references, a deliberately altered and a missing reference, the report, and Ctrl-C."""
import json
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from deepvis_repro.reproduce.metrics import high_frequency_energy, ssim, total_variation

REPO = Path(__file__).resolve().parents[1]
QUICK_REFS = REPO / "reference_outputs" / "efficientnet_lite0" / "quick"


def test_metrics_on_hand_made_images():
    flat = np.full((64, 64, 3), 120, np.uint8)
    assert total_variation(flat) == 0 and high_frequency_energy(flat) == 0
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert high_frequency_energy(noise) > 0.7  # white noise: most power at high frequencies
    ramp = np.repeat(np.linspace(0, 255, 64)[None, :, None], 64, 0).repeat(3, 2).astype(np.uint8)
    assert high_frequency_energy(ramp) < 0.05
    assert total_variation(ramp) == pytest.approx((255 / 63 / 255 * 63 / 64) / 2, rel=0.05)
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    assert total_variation(checker) == pytest.approx(1.0) and high_frequency_energy(checker) > 0.99
    assert ssim(noise, noise) == pytest.approx(1.0) and ssim(noise, flat) < 0.1


class Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> does not close <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def check_report(folder: Path):
    text = (folder / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    c = Checker()
    c.feed(text)
    assert not c.errors and not c.stack, (c.errors, c.stack)
    assert c.images and all((folder / src).is_file() for src in c.images)
    return c.images


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick profile (shortened) against references made by a first run on this machine,
    one altered and one removed. (Stored references are machine-specific: optimized images
    diverge across CPUs within tens of steps; see the README.)"""
    tmp = tmp_path_factory.mktemp("quick")
    refs = tmp / "refs"
    r = subprocess.run(["deepvis-reproduce", "profile.steps=60", "judge=null", f"references={refs}",
                        "update_references=true", f"hydra.run.dir={tmp / 'make'}"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((refs / "manifest.json").read_text())
    assert manifest["machine"]["cpu"] and manifest["profile"] == "quick"
    altered = refs / "paper_3__fc_366.png"
    shutil.copy(refs / "none__blocks.9_10.png", altered)  # another unit's picture in its place
    (refs / "none__fc_130.png").unlink()
    out = tmp / "run"
    r = subprocess.run(["deepvis-reproduce", "profile.steps=60", f"references={refs}", f"hydra.run.dir={out}"],
                       capture_output=True, text=True, timeout=900)
    return r, out


def test_quick_profile_matches_references_except_the_altered_one(quick_run):
    r, out = quick_run
    assert r.returncode == 1, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    status = {(x["setting"], x["unit"]): x["reference"] for x in metrics["results"]}
    assert len(status) == 15
    assert status[("paper_3", "fc:366")] == "differs"
    assert status[("none", "fc:130")] == "missing"
    assert all(v == "match" for k, v in status.items() if k not in {("paper_3", "fc:366"), ("none", "fc:130")})
    assert "1 image(s) differ from their references" in r.stderr and "paper_3" in r.stderr
    assert "have no reference" in r.stderr
    ssims = [x["ssim"] for x in metrics["results"] if x["reference"] == "match"]
    assert min(ssims) > 0.999  # the same machine: the same images
    # one verdict, the same in the console and at the top of the report
    assert metrics["verdict"] == "13/14 images match the references (SSIM >= 0.8); 1 without a reference"
    import html
    assert metrics["verdict"] in r.stdout and html.escape(metrics["verdict"]) in (out / "report.html").read_text()


def test_stored_references_record_their_machine():
    """The references in the repository say which CPU made them (they match only there)."""
    m = json.loads((QUICK_REFS / "manifest.json").read_text())
    assert m["machine"]["cpu"] and m["profile"] == "quick" and len(list(QUICK_REFS.glob("*.png"))) == 15


def test_outputs_and_measures(quick_run):
    r, out = quick_run
    metrics = json.loads((out / "metrics.json").read_text())
    from deepvis_repro.reproduce.report import fmt_rank
    for s in metrics["summary"]:  # console and report show ranks alike
        assert f"median judge rank {fmt_rank(s['median_judge_rank'])}" in r.stdout
    for x in metrics["results"]:
        assert {"setting", "unit", "activation", "ssim", "total_variation", "hf_energy", "judge_rank"} <= set(x)
        assert (out / x["image"]).is_file()
    by = {(x["setting"], x["unit"]): x for x in metrics["results"]}
    # plain ascent reaches the highest activation, and its images are the least smooth
    assert by[("none", "fc:130")]["activation"] > by[("paper_3", "fc:130")]["activation"]
    summary = {s["setting"]: s for s in metrics["summary"]}
    assert summary["none"]["mean_hf_energy"] > summary["paper_3"]["mean_hf_energy"]
    assert (out / "grid.png").is_file()
    images = check_report(out)
    assert {"grid.png", "grid_stretched.png"} <= set(images) and len(images) == 17


def test_ctrl_c_leaves_a_valid_partial_report(tmp_path):
    out = tmp_path / "run"
    # a child of a background job inherits "SIGINT ignored": restore the default, or it never stops
    p = subprocess.Popen(["deepvis-reproduce", "profile.steps=400", "judge=null",
                          f"references={tmp_path / 'none'}", f"hydra.run.dir={out}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t = time.time()
    seen = ""
    while "reproduce quick" not in seen and time.time() - t < 300:
        seen += p.stderr.readline()
    time.sleep(3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-1000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True
    assert [x["setting"] for x in metrics["results"]] == ["paper_1"] * 3
    # the unfinished setting says so: partial, with the steps it ran
    assert metrics["partial_settings"] == ["paper_1"]
    assert all(x["partial"] and 0 < x["steps_run"] < 400 and x["steps"] == 400 for x in metrics["results"])
    check_report(out)
    report = (out / "report.html").read_text()
    assert "Interrupted" in report and "marked partial" in report
