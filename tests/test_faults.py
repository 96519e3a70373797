"""No lost work, no corrupt files, no unbounded memory: signals in every phase (the writing phase
slowed down so a signal lands in it), full disks (a tiny tmpfs, and a simulated ENOSPC), runs
started in the same second, tampered and unwritable caches, huge claims from tiny files, FIFOs
and decompression bombs among images, and the atlas resumed after SIGKILL."""
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import deepvis_repro as dv
from deepvis_repro.errors import DeepvisError

HERE = Path(__file__).resolve().parent
SLOW = [sys.executable, str(HERE / "plugins" / "slow_writes.py")]
ENV = dict(os.environ, SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy")


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args, **kw):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=default_sigint, **kw)


def wait_for(p, text, timeout=300):
    seen, t = "", time.time()
    while text not in seen and time.time() - t < timeout:
        line = p.stderr.readline()
        if not line and p.poll() is not None:
            break
        seen += line
    assert text in seen, seen[-2000:]
    return seen


def complete_png(path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def no_partials(folder) -> bool:
    return not [p for p in Path(folder).rglob("*") if p.name.endswith(".partial")]


# ----- signals while writing -------------------------------------------------------------------
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_optimize_writes_keeps_every_file(tmp_path, sig, status):
    out = tmp_path / "run"
    p = start(SLOW + ["optimize", "units=[fc:130,fc:1,blocks.3:2]", "optimize.steps=3", f"hydra.run.dir={out}"])
    wait_for(p, "WRITING")
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == status, err[-1500:]
    rec = json.loads((out / "results.json").read_text())  # written in full, after the signal
    assert [r["unit"] for r in rec["results"]] == ["fc:130", "fc:1", "blocks.3:2:14:14"]
    for r in rec["results"]:
        assert complete_png(out / r["image"]) and complete_png(out / r["image_without_mean"])
    assert complete_png(out / "grid.png") and no_partials(out)


def test_sigterm_while_the_atlas_is_written_exits_143_and_counts_what_was_written(tmp_path):
    """Issue 21: it exited 130 and said '0 of 4 units' after a batch had been written."""
    atlas = tmp_path / "A"
    p = start(SLOW + ["optimize", "units=[blocks.2:0,blocks.2:1,blocks.2:2,blocks.2:3]", "optimize.steps=2",
                      "optimize.batch_size=2", f"atlas.dir={atlas}"])
    wait_for(p, f"WRITING {atlas}/regularized_opt")  # the first batch's images
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-1500:]
    assert f"interrupted: 2 of 4 units are in {atlas}" in err
    assert len(list((atlas / "regularized_opt" / "blocks.2").glob("*.jpg"))) == 2


def test_sigkill_while_optimize_writes_leaves_whole_files_or_none(tmp_path):
    out = tmp_path / "run"
    p = start(SLOW + ["optimize", "units=[fc:130,fc:1,blocks.3:2]", "optimize.steps=3", f"hydra.run.dir={out}"])
    wait_for(p, "WRITING")
    time.sleep(1.0)  # a couple of files written, one in progress
    p.kill()
    p.wait()
    pngs = list(out.glob("*.png"))
    assert pngs, "nothing was written before the kill"
    assert all(p.stat().st_size > 0 and complete_png(p) for p in pngs)
    assert not (out / "results.json").exists() or json.loads((out / "results.json").read_text())


def test_a_signal_while_the_harness_writes_keeps_all_settings(tmp_path):
    out = tmp_path / "run"
    p = start(SLOW + ["reproduce", "profile.steps=3", "profile.classes=[130,366]", "judge=null", f"references={tmp_path / 'none'}",
                      f"hydra.run.dir={out}"])
    wait_for(p, "WRITING")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-1500:]
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["results"]) == 15 and {r["setting"] for r in m["results"]} == {"paper_1", "paper_2", "paper_3",
                                                                              "paper_4", "none"}
    assert all(complete_png(out / r["image"]) for r in m["results"])
    assert (out / "report.html").read_text().rstrip().endswith("</html>") and no_partials(out)


#: Two settings are enough to see a reference set change all at once (and fewer images to write
#: keep these tests short: they run the harness seven times).
TWO = "profile.settings=[paper_1,paper_2]"


def test_references_change_all_at_once(tmp_path):
    refs = tmp_path / "refs"
    r = subprocess.run(["deepvis-reproduce", "profile.steps=2", "profile.classes=[130,366]", TWO, "judge=null",
                        f"references={refs}", "update_references=true", f"hydra.run.dir={tmp_path / 'a'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before = {p.name: p.read_bytes() for p in refs.iterdir()}
    assert len(before) == 8  # 6 images, trajectories.json, manifest.json
    # a second update with other images, killed while writing them: the old set stays whole
    p = start(SLOW + ["reproduce", "profile.steps=4", "profile.classes=[130,366]", TWO, "judge=null",
                      f"references={refs}", "update_references=true", f"hydra.run.dir={tmp_path / 'b'}"])
    wait_for(p, f"WRITING {tmp_path}/.refs")  # the new set's first file, in its hidden sibling folder
    p.kill()
    p.wait()
    after = {p.name: p.read_bytes() for p in refs.iterdir()}
    assert after == before
    # ...and the next run compares cleanly (the half-written sibling is cleared away)
    r = subprocess.run(["deepvis-reproduce", "profile.steps=2", "profile.classes=[130,366]", TWO, "judge=null",
                        f"references={refs}", f"hydra.run.dir={tmp_path / 'c'}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "References: 6/6 images match (6 identical)" in r.stdout
    assert not list(tmp_path.glob(".refs.*"))
    # a damaged reference is reported as damaged, not a crash
    (refs / "paper_2__fc_130.png").write_bytes(b"")
    r = subprocess.run(["deepvis-reproduce", "profile.steps=2", "profile.classes=[130,366]", TWO, "judge=null",
                        f"references={refs}", f"hydra.run.dir={tmp_path / 'd'}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "damaged reference" in r.stderr and "Traceback" not in r.stderr
    assert "References: 5/6 images match (5 identical)" in r.stdout
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert [x["reference"] for x in m["results"] if x["unit"] == "fc:130" and x["setting"] == "paper_2"] == ["damaged"]
    report = (tmp_path / "d" / "report.html").read_text()
    assert "References: 5/6 images match (5 identical)" in report


def test_a_signal_while_references_are_written_keeps_the_run(tmp_path):
    """SIGINT or SIGTERM while update_references=true writes the new set: the old set stays in
    force, and the run's own images, metrics and report are all on disk."""
    refs = tmp_path / "refs"
    r = subprocess.run(["deepvis-reproduce", "profile.steps=2", "profile.classes=[130,366]", TWO, "judge=null",
                        f"references={refs}", "update_references=true", f"hydra.run.dir={tmp_path / 'a'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before = {p.name: p.read_bytes() for p in refs.iterdir()}
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        out = tmp_path / f"run_{code}"
        p = start(SLOW + ["reproduce", "profile.steps=3", "profile.classes=[130,366]", TWO, "judge=null",
                          f"references={refs}", "update_references=true", f"hydra.run.dir={out}"])
        wait_for(p, f"WRITING {tmp_path}/.refs")  # inside the new set's hidden sibling folder
        p.send_signal(sig)
        _, err = p.communicate(timeout=300)
        assert p.returncode == code, err[-1500:]
        assert "keeps the old set" in err and "Traceback" not in err
        assert {q.name: q.read_bytes() for q in refs.iterdir()} == before
        m = json.loads((out / "metrics.json").read_text())
        assert len(m["results"]) == 6 and all(complete_png(out / x["image"]) for x in m["results"])
        assert all(x["reference"] == "being written" for x in m["results"])
        assert (out / "report.html").read_text().rstrip().endswith("</html>") and no_partials(out)


# ----- full disks ------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_leaves_no_temporaries(lite0, monkeypatch, tmp_path):
    """Simulated ENOSPC at results.json (after the images): the images stay, results.json is
    not cut, nothing half-written remains."""
    import deepvis_repro.files as files
    from deepvis_repro.optimize import optimize
    from deepvis_repro.outputs import write_optimization

    r = optimize(lite0, ["fc:130", "fc:2"], steps=2, progress=False)
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("results.json" + "") or \
                ".results.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(DeepvisError, match=r"disk full while writing .*results\.json"):
        write_optimization(str(tmp_path), lite0, r)
    assert not (tmp_path / "results.json").exists()
    assert complete_png(tmp_path / "fc_130.png") and complete_png(tmp_path / "fc_2_nomean.png")
    assert no_partials(tmp_path)


@contextlib.contextmanager
def tmpfs(mnt: Path, options: str):
    """A tmpfs mounted at mnt for the block (skips the test where mounting is not allowed)."""
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.fixture
def tiny_tmpfs(tmp_path):
    with tmpfs(tmp_path / "tiny", "size=160k") as mnt:
        yield mnt


@pytest.fixture
def read_only_dir(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mnt:
        yield mnt


def test_read_only_places_are_one_line(read_only_dir, tmp_path):
    """Issue 21: the default outputs/ in a read-only working folder was a 109-line traceback, and
    a new atlas.dir on a read-only mount a traceback too."""
    r = subprocess.run(["deepvis-optimize", "optimize.steps=2"], cwd=read_only_dir, capture_output=True,
                       text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "is not writable; run from a writable folder or give hydra.run.dir=DIR" in r.stderr
    r = subprocess.run(["deepvis-mine", "layers=[fc]", f"atlas.dir={read_only_dir / 'new'}"], capture_output=True,
                       text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "is not writable" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_real_full_disk(tiny_tmpfs):
    r = subprocess.run(["deepvis-optimize", "units=[fc:130,fc:1,fc:2,fc:3]", "optimize.steps=2",
                        f"hydra.run.dir={tiny_tmpfs / 'run'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "disk full while writing" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3  # the progress line(s), then the one error line
    assert no_partials(tiny_tmpfs)
    assert all(complete_png(p) for p in (tiny_tmpfs / "run").glob("*.png"))
    rj = tiny_tmpfs / "run" / "results.json"
    assert not rj.exists() or json.loads(rj.read_text())


# ----- concurrent runs -------------------------------------------------------------------------
def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    ps = [subprocess.Popen(["deepvis-optimize", f"unit=fc:{u}", "optimize.steps=2"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for u in (1, 2, 3)]
    for p in ps:
        p.communicate(timeout=300)
        assert p.returncode == 0
    runs = sorted(tmp_path.glob("outputs/*/*/results.json"))
    assert len(runs) == 3
    assert sorted(json.loads(r.read_text())["results"][0]["unit"] for r in runs) == ["fc:1", "fc:2", "fc:3"]


# ----- the Caffe cache --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caffe_files(tmp_path_factory):
    from caffe_models import caffenet_shaped, random_weights, write_model

    d = tmp_path_factory.mktemp("cache")
    layers, size = caffenet_shaped()
    blobs, _ = random_weights(layers, size, seed=7)
    return write_model(layers, size, blobs, d)


def _fc8(b, seed=0):
    x = torch.randn(2, 3, *b.input_size, generator=torch.Generator().manual_seed(seed)) * 50
    with torch.no_grad():
        return b.forward(x, ["fc8"])["fc8"]


def test_a_tampered_or_incomplete_cache_entry_is_rebuilt(caffe_files, tmp_path):
    from deepvis_repro_backends.caffe_backend import cache_key

    proto, weights = caffe_files
    clean = _fc8(dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=str(tmp_path)))
    entry = tmp_path / f"{cache_key(str(proto), str(weights))}.pt"
    data = torch.load(entry, weights_only=True)
    data["blobs"]["fc8/0"] = data["blobs"]["fc8/0"] * -1.0  # right shapes, other values
    torch.save(data, entry)
    again = _fc8(dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=str(tmp_path)))
    assert torch.equal(again, clean)  # the tampered entry was not used...
    assert torch.load(entry, weights_only=True)["blobs"]["fc8/0"].equal(-data["blobs"]["fc8/0"])  # ...and was rebuilt
    del data["blobs"]["fc8/0"]  # an incomplete entry (with a digest that matches it)
    from deepvis_repro.files import tensors_sha256
    data["digest"] = tensors_sha256(data["blobs"])
    torch.save(data, entry)
    b = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=str(tmp_path))
    assert torch.equal(_fc8(b), clean)
    entry.write_bytes(b"\x00" * 100)  # garbage
    assert torch.equal(_fc8(dv.load_backend("caffe", prototxt=str(proto), weights=str(weights),
                                            cache_dir=str(tmp_path))), clean)


def test_a_resealed_or_transplanted_cache_entry_is_not_used(caffe_files, tmp_path):
    """Issue 21: an entry edited and given a recomputed digest, or another model's valid entry
    copied under this key, was used silently."""
    import hashlib

    from caffe_models import caffenet_shaped, random_weights, write_model
    from deepvis_repro.files import tensors_sha256
    from deepvis_repro_backends.caffe_backend import cache_key

    proto, weights = caffe_files
    cache = tmp_path / "cache"
    clean = _fc8(dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=str(cache)))
    entry = cache / f"{cache_key(str(proto), str(weights))}.pt"
    data = torch.load(entry, weights_only=True)
    data["blobs"]["fc8/0"] = data["blobs"]["fc8/0"] * -1.0
    data["seal"] = hashlib.sha256(tensors_sha256(data["blobs"]).encode()).hexdigest()  # re-digested
    torch.save(data, entry)
    assert torch.equal(_fc8(dv.load_backend("caffe", prototxt=str(proto), weights=str(weights),
                                            cache_dir=str(cache))), clean)
    layers, size = caffenet_shaped()
    (tmp_path / "other").mkdir()
    other = write_model(layers, size, random_weights(layers, size, seed=8)[0], tmp_path / "other")
    dv.load_backend("caffe", prototxt=str(other[0]), weights=str(other[1]), cache_dir=str(cache))
    (cache / f"{cache_key(str(other[0]), str(other[1]))}.pt").replace(entry)  # a valid entry, another model
    assert torch.equal(_fc8(dv.load_backend("caffe", prototxt=str(proto), weights=str(weights),
                                            cache_dir=str(cache))), clean)


def test_an_unwritable_cache_means_no_cache_and_the_same_result(caffe_files, tmp_path, tiny_tmpfs):
    proto, weights = caffe_files
    clean = _fc8(dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=""))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for cache in (not_a_dir / "cache", "/proc/deepvis-cache", tiny_tmpfs):  # not a folder, read-only, full
        b = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=str(cache))
        assert torch.equal(_fc8(b), clean)
    assert no_partials(tiny_tmpfs) and not list(Path(tiny_tmpfs).glob("*.pt"))


def test_the_cache_key_cannot_collide(tmp_path):
    from deepvis_repro_backends.caffe_backend import cache_key

    (tmp_path / "p1").write_bytes(b"ab")
    (tmp_path / "m1").write_bytes(b"c")
    (tmp_path / "p2").write_bytes(b"a")
    (tmp_path / "m2").write_bytes(b"bc")  # p1 + m1 == p2 + m2, byte for byte
    assert cache_key(str(tmp_path / "p1"), str(tmp_path / "m1")) != cache_key(str(tmp_path / "p2"), str(tmp_path / "m2"))


# ----- huge claims from tiny files -------------------------------------------------------------
PEAK = ("import atexit, runpy, sys\n"
        "def peak():\n"
        "    for l in open('/proc/self/status'):\n"
        "        if l.startswith('VmHWM'): print('PEAK_KB', l.split()[1], file=sys.stderr)\n"
        "atexit.register(peak)\n"
        "sys.argv = sys.argv[1:]\n"
        "from deepvis_repro import cli\n"
        "getattr(cli, sys.argv[0] + '_main')()\n")


def peak_run(app, *args):
    r = subprocess.run([sys.executable, "-c", PEAK, app, *args], capture_output=True, text=True, timeout=300, env=ENV)
    kb = [int(l.split()[1]) for l in r.stderr.splitlines() if l.startswith("PEAK_KB")]
    err = "\n".join(l for l in r.stderr.splitlines() if not l.startswith("PEAK_KB"))
    return r.returncode, err, (kb[0] / 1024 if kb else None)


def test_a_tiny_prototxt_claiming_a_huge_layer(caffe_files, tmp_path):
    proto, weights = caffe_files
    huge = tmp_path / "huge.prototxt"
    huge.write_text(proto.read_text().replace("num_output: 32", "num_output: 120000000", 1))  # conv3
    assert huge.stat().st_size < 5000
    rc, err, peak = peak_run("inspect", "backend=caffe", f"backend.prototxt={huge}", f"backend.weights={weights}",
                             "backend.cache_dir=")
    assert rc == 2 and "do not match the prototxt" in err and "Traceback" not in err, err
    assert peak < 1500, f"{peak:.0f} MB"
    big_input = tmp_path / "input.prototxt"
    big_input.write_text(proto.read_text().replace("dim: 69", "dim: 90000"))
    rc, err, peak = peak_run("inspect", "backend=caffe", f"backend.prototxt={big_input}", f"backend.weights={weights}")
    assert rc == 2 and "input size 90000x90000" in err, err
    assert peak < 1500


def png_header_only(path, w, h):
    """A valid PNG signature and IHDR claiming w x h, with a tiny (wrong) image stream."""
    import struct

    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                           + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [28000, 30000])
def test_a_small_file_claiming_a_huge_image(tmp_path, side):
    png_header_only(tmp_path / "bomb.png", side, side)
    rc, err, peak = peak_run("inspect", f"image={tmp_path / 'bomb.png'}")
    assert rc == 2 and f"{side}x{side}" in err and "100 MP limit" in err and "Traceback" not in err, err
    assert peak < 1500


def test_the_image_folder_view_skips_fifos_and_bombs_and_stops_on_sigterm(tmp_path, photos):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(photos["coffee"]).save(d / "a.png")
    png_header_only(d / "b_bomb.png", 28000, 28000)
    os.mkfifo(d / "c_fifo.jpg")
    Image.fromarray(photos["rocket"]).save(d / "d.png")
    stats = tmp_path / "s.json"
    r = subprocess.run(["deepvis-live", "source=images", f"source.path={d}", "live.max_frames=20",
                        "live.keys=[e,e,e,e]", f"live.stats={stats}"], capture_output=True, text=True, timeout=120,
                       env=ENV)
    assert r.returncode == 0, r.stderr
    s = json.loads(stats.read_text())
    assert s["source"].startswith("a.png") and "b_bomb.png" in s["message"] and "c_fifo.jpg" in s["message"]
    # SIGTERM ends the view at any time, with its stats
    stats.unlink()
    p = start(["deepvis-live", "source=images", f"source.path={d}", f"live.stats={stats}"])
    wait_for(p, "deepvis-live: showing")  # the view runs (an event, not a delay)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err[-2000:]
    s = json.loads(stats.read_text())  # ended by the signal, with its stats written
    assert s["source"].startswith("a.png") and s["frames"] >= 0


def test_unwritable_outputs_are_checked_before_the_run(tmp_path, photos):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(photos["coffee"]).save(tmp_path / "imgs" / "a.png")
    r = subprocess.run(["deepvis-live", "source=images", f"source.path={tmp_path / 'imgs'}", "live.max_frames=5",
                        f"live.stats={tmp_path / 'no' / 'such' / 's.json'}"], capture_output=True, text=True,
                       timeout=120, env=ENV)
    assert r.returncode == 2 and "live.stats: folder" in r.stderr and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(["deepvis-optimize", "optimize.steps=2", "hydra.run.dir=/proc/deepvis-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot make the run folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----- the atlas --------------------------------------------------------------------------------
def test_all_units_optimization_resumed_after_sigkill_gives_the_uninterrupted_images(tmp_path):
    args = ["units=[blocks.1:all]", "optimize.steps=4", "optimize.batch_size=4"]
    r = subprocess.run(["deepvis-optimize", *args, f"atlas.dir={tmp_path / 'ref'}"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    p = start(SLOW + ["optimize", *args, f"atlas.dir={tmp_path / 'k'}"], )
    wait_for(p, "blocks.1_0005")  # killed while writing the second batch
    p.kill()
    p.wait()
    r = subprocess.run(["deepvis-optimize", *args, f"atlas.dir={tmp_path / 'k'}"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ref = sorted((tmp_path / "ref" / "regularized_opt" / "blocks.1").glob("*.jpg"))
    got = sorted((tmp_path / "k" / "regularized_opt" / "blocks.1").glob("*.jpg"))
    assert [p.name for p in ref] == [p.name for p in got] and len(ref) == 25  # 24 units + whole_layer
    for a, b in zip(ref, got):
        assert a.read_bytes() == b.read_bytes(), a.name
    rec = json.loads((tmp_path / "k" / "regularized_opt" / "blocks.1" / "results.json").read_text())
    assert len(rec["units"]) == 24


def test_damaged_atlas_files_are_one_line(lite0, tmp_path, photos):
    """Issue 21: an empty checkpoint, a manifest that is a list or has a string where an object
    belongs, a truncated corpus.txt: each was a traceback."""
    from deepvis_repro.atlas.mining import load_result, mine

    for name in ("a.png", "b.png"):
        Image.fromarray(photos["coffee"]).save(tmp_path / name)
    atlas = tmp_path / "A"
    mine(lite0, str(tmp_path), ["fc"], top_k=1, progress=False, atlas_dir=atlas)
    manifest = (atlas / "manifest.json").read_text()
    (atlas / "corpus.txt").write_text((atlas / "corpus.txt").read_text().splitlines()[0] + "\n")
    with pytest.raises(DeepvisError, match="corpus.txt lists 1 images, the manifest 2"):
        load_result(atlas)
    for bad in ("[1, 2]", manifest.replace('"layers": {', '"layers": "x", "old": {')):
        (atlas / "manifest.json").write_text(bad)
        with pytest.raises(DeepvisError, match="manifest"):
            load_result(atlas)
    # an empty checkpoint, from the command line
    other = tmp_path / "B"
    (other / "checkpoint").mkdir(parents=True)
    (other / "checkpoint" / "mining.npz").write_bytes(b"")
    r = subprocess.run(["deepvis-mine", f"corpus.path={tmp_path}", "layers=[fc]", "montages=false",
                        f"atlas.dir={other}"], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "checkpoint is unusable" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_run_into_an_atlas_leaves_no_run_folder_or_log(tmp_path):
    """Issue 21: every 'deepvis-optimize ... atlas.dir=A' left an empty outputs/<date>/<time>/."""
    r = subprocess.run(["deepvis-optimize", "units=[fc:1]", "optimize.steps=2", f"atlas.dir={tmp_path / 'A'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.*"))
    r = subprocess.run(["deepvis-optimize", "units=[fc:1]", "optimize.steps=2", f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0 and not list((tmp_path / "run").glob("*.log"))  # no empty cli.log


def test_a_read_only_cache_still_gives_the_demo_corpus(read_only_dir, monkeypatch):
    """Issue 21: a read-only cache folder was a traceback for the demo corpus (the README says an
    unwritable cache means no cache and the same result)."""
    from deepvis_repro.atlas.corpus import demo_corpus

    monkeypatch.setenv("XDG_CACHE_HOME", str(read_only_dir))
    c = demo_corpus()
    assert len(c.items) == 400 and not str(c.source).startswith(str(read_only_dir))
    assert all(os.path.isfile(p) for p in c.items[:5])


def test_the_tests_keep_out_of_the_users_cache():
    """Issue 21: a test run left 85 MB of Caffe cache in the real ~/.cache."""
    home_cache = os.path.join(os.path.expanduser("~"), ".cache")
    assert not os.path.abspath(os.environ["XDG_CACHE_HOME"]).startswith(home_cache)
    from deepvis_repro_backends.caffe_backend import default_cache_dir
    assert not str(default_cache_dir()).startswith(home_cache)
