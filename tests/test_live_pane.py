"""The live view's unit pane: a real atlas made here (mined top-9, their deconv, optimized
images), pattern mode, an on-demand image, and the original toolbox's unit_jpg_vis layout."""
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from deepvis_repro.atlas import mine
from deepvis_repro.atlas.optimized import optimize_into_atlas
from deepvis_repro.atlas.patches import render_montages
from deepvis_repro.atlas.reading import write_readings
from deepvis_repro.atlas.store import AtlasReader, AtlasStore, describe, load_reading
from deepvis_repro.live.draw import CAPTION_H, READING_H, STATUS_H, UNIT_PANE

ENV = dict(os.environ, SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy")
W, H = 1280, 720
SLOT_H = (H - STATUS_H - 16 - READING_H) // 3 - CAPTION_H


def slot(shot: np.ndarray, i: int, size: tuple[int, int]) -> np.ndarray:
    """The pixels of pane slot i (0 optimized, 1 top-9, 2 deconv) where a picture of size (w, h) sits."""
    w, h = size
    x = W - UNIT_PANE - 8 + (UNIT_PANE - w) // 2
    y = 8 + i * (SLOT_H + CAPTION_H) + CAPTION_H
    return shot[y:y + h, x:x + w]


def fitted(path, quadrant=False, stretch=False):
    im = Image.open(path).convert("RGB")
    if quadrant:
        w, h = im.size
        im = im.crop((0, h // 2, w // 2, h))
    w, h = im.size
    s = min(UNIT_PANE / w, SLOT_H / h)
    a = np.asarray(im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))
    if stretch:
        from deepvis_repro.images import stretched
        a = stretched(a)
    return a


def run_live(*args, timeout=300):
    return subprocess.run(["deepvis-live", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory, lite0, photos):
    """A real atlas: 24 photo crops mined for blocks.4, montages of units 0-5, optimized images
    of units 0-2 (unit 3 has none: on-demand makes it)."""
    d = tmp_path_factory.mktemp("pane")
    imgs = d / "imgs"
    imgs.mkdir()
    for name, img in photos.items():
        h, w = img.shape[:2]
        for k in range(6):
            y, x = (k // 3) * h // 3, (k % 3) * w // 3
            Image.fromarray(img[y:y + 2 * h // 3, x:x + 2 * w // 3]).save(imgs / f"{name}_{k}.png")
    root = d / "atlas"
    mine(lite0, str(imgs), ["blocks.4"], top_k=9, progress=False, atlas_dir=root)
    render_montages(lite0, root, units=range(6), progress=False)
    optimize_into_atlas(lite0, root, ["blocks.4:0", "blocks.4:1", "blocks.4:2"], steps=10, progress=False)
    write_readings(lite0, root, judge=lite0, sample=24, progress=False)
    return root, imgs


def test_pane_shows_the_selected_units_three_pictures(atlas, tmp_path):
    root, imgs = atlas
    shot, stats = tmp_path / "shot.png", tmp_path / "stats.json"
    r = run_live("source=images", f"source.path={imgs}", f"live.atlas={root}", "live.layer=blocks.4",
                 "live.on_demand.enabled=false", "live.max_frames=15", "live.keys=[l,l]",
                 f"live.screenshot={shot}", f"live.stats={stats}")
    assert r.returncode == 0, r.stderr
    s = json.loads(stats.read_text())
    assert (s["layer"], s["unit"]) == ("blocks.4", 2)
    assert s["pane"]["shown"] == ["regularized_opt", "max_im", "max_deconv"] and not s["pane"]["missing"]
    # the unit's reading under its pictures (blocks.4's 67 px field: judged on its patches)
    assert s["pane"]["reading"] == describe(load_reading(root, "blocks.4"), 2)
    assert s["pane"]["reading"].startswith("its top patches look like: ")
    img = np.asarray(Image.open(shot)).astype(int)
    st = AtlasStore(root)
    for i, kind in enumerate(("regularized_opt", "max_im", "max_deconv")):
        want = fitted(st.unit_file(kind, "blocks.4", 2), stretch=kind == "regularized_opt").astype(int)
        got = slot(img, i, want.shape[1::-1])
        assert np.abs(got - want).mean() < 3, kind  # the stored picture, as stored (pygame's blit is exact)
    # another unit's montage differs: the pane follows the cursor
    other = fitted(st.unit_file("max_im", "blocks.4", 3)).astype(int)
    assert np.abs(slot(img, 1, other.shape[1::-1]) - other).mean() > 10


def test_pane_captions_count_the_atlas_own_k(lite0, photos, tmp_path):
    """An atlas mined with top_k=4 is captioned "top 4" (the reader's k), not the original's 9."""
    for name, img in photos.items():
        Image.fromarray(img).save(tmp_path / f"{name}.png")
    mine(lite0, [str(tmp_path / f"{n}.png") for n in photos], ["blocks.1"], top_k=4, progress=False,
         atlas_dir=tmp_path / "a")
    assert AtlasReader(tmp_path / "a").top_k == 4


def test_pattern_mode_and_an_on_demand_image(atlas, tmp_path):
    root, imgs = atlas
    shot, stats = tmp_path / "shot.png", tmp_path / "stats.json"
    st = AtlasStore(root)
    target = st.unit_file("regularized_opt", "blocks.4", 3)
    assert not os.path.exists(target)
    r = run_live("source=images", f"source.path={imgs}", f"live.atlas={root}", "live.layer=blocks.4",
                 "live.on_demand.steps=12", "live.max_frames=20", "live.keys=[l,l,l,s]",
                 f"live.screenshot={shot}", f"live.stats={stats}", "live.sync_timeout=120")
    assert r.returncode == 0, r.stderr
    s = json.loads(stats.read_text())
    assert s["pattern"] is True and s["unit"] == 3
    assert [d["unit"] for d in s["on_demand"]["done"]] == ["blocks.4:3:14:14"]  # the map's centre
    assert s["on_demand"]["steps"] == 12
    assert os.path.isfile(target)  # stored in the atlas
    rec = json.loads((root / "regularized_opt" / "blocks.4" / "results.json").read_text())
    assert rec["on_demand"]["3"]["steps"] == 12
    assert "regularized_opt" in s["pane"]["shown"]
    img = np.asarray(Image.open(shot)).astype(int)
    want = fitted(target, stretch=True).astype(int)
    assert np.abs(slot(img, 0, want.shape[1::-1]) - want).mean() < 3  # the new image is in the pane
    # pattern mode: the grid shows every unit's optimized image in a 7x6 sprite (40 units; units
    # 0-3 have one, the rest are black tiles), fitted into the grid pane
    from deepvis_repro.images import stretch_around_grey
    gw, gh = W - 2 * 300 - 32 - UNIT_PANE - 8, H - STATUS_H - CAPTION_H - 16
    tile = min(gw // 7, gh // 6) - 2
    sw, sh = 7 * (tile + 2) + 2, 6 * (tile + 2) + 2
    scale = min(gw / sw, gh / sh)
    x0, y0, t = 624 + int(2 * scale), 8 + int(2 * scale), int(tile * scale)
    for unit, col in ((0, 0), (3, 3)):
        im = Image.open(st.unit_file("regularized_opt", "blocks.4", unit)).convert("RGB").resize((t, t))
        want = stretch_around_grey(np.asarray(im).astype(float) - 127.5).astype(int)
        xs = x0 + int(col * (tile + 2) * scale)
        got = img[y0 + 2:y0 + t - 2, xs + 2:xs + t - 2]
        assert np.abs(got - want[2:-2, 2:-2]).mean() < 25, unit
    empty = img[y0 + 4:y0 + t - 4, x0 + int(5 * (tile + 2) * scale) + 4:x0 + int(5 * (tile + 2) * scale) + t - 4]
    assert empty.max() < 10  # unit 5 has no optimized image: a black tile


def test_the_original_toolboxs_unit_jpg_vis_folder(tmp_path, photos):
    """CaffeNet users' download: regularized_opt/<layer>/<layer>_%04d_montage.jpg (its bottom-left
    quadrant is shown), max_im/ and max_deconv/, and pool1 shown with conv1's pictures."""
    from caffe_models import caffenet_geometry, random_weights, write_model

    layers_def, size = caffenet_geometry()
    blobs, _ = random_weights(layers_def, size, seed=1)
    proto, weights = write_model(layers_def, size, blobs, tmp_path)
    root = tmp_path / "unit_jpg_vis"
    colours = {"max_im": (20, 60, 230), "max_deconv": (230, 40, 40)}
    for unit in (2, 5):
        for kind, c in colours.items():
            (root / kind / "conv1").mkdir(parents=True, exist_ok=True)
            a = np.zeros((200, 200, 3), np.uint8)
            a[:] = c
            a[:, :, 1] = 40 * unit  # each unit its own shade
            Image.fromarray(a).save(root / kind / "conv1" / f"conv1_{unit:04d}.jpg")
        (root / "regularized_opt" / "conv1").mkdir(parents=True, exist_ok=True)
        m = np.full((240, 240, 3), 255, np.uint8)  # a 2x2 montage: white except the bottom-left
        m[120:, :120] = (30, 200, 60)
        Image.fromarray(m).save(root / "regularized_opt" / "conv1" / f"conv1_{unit:04d}_montage.jpg")
    (tmp_path / "img").mkdir()
    Image.fromarray(photos["coffee"]).save(tmp_path / "img" / "coffee.png")
    shot, stats = tmp_path / "shot.png", tmp_path / "stats.json"
    r = run_live("backend=caffe", f"backend.prototxt={proto}", f"backend.weights={weights}", "backend.cache_dir=",
                 "source=images", f"source.path={tmp_path / 'img'}", f"live.atlas={root}",
                 "live.layer=pool1", "live.on_demand.enabled=false", "live.max_frames=10", "live.keys=[l,l,l,l,l]",
                 f"live.screenshot={shot}", f"live.stats={stats}")
    assert r.returncode == 0, r.stderr
    s = json.loads(stats.read_text())
    assert (s["layer"], s["unit"]) == ("pool1", 5)
    assert s["pane"]["shown"] == ["regularized_opt", "max_im", "max_deconv"]
    img = np.asarray(Image.open(shot)).astype(int)
    opt = slot(img, 0, (SLOT_H, SLOT_H))
    assert opt[..., 1].mean() > 150 and opt[..., 0].mean() < 110  # the green quadrant, stretched
    for i, (kind, c) in enumerate(colours.items(), start=1):
        got = slot(img, i, (SLOT_H, SLOT_H)).reshape(-1, 3).mean(0)
        assert np.abs(got - np.array([c[0], 200, c[2]])).max() < 12, (kind, got)
    # a unit the folder lacks shows as missing, not an error
    r = run_live("backend=caffe", f"backend.prototxt={proto}", f"backend.weights={weights}", "backend.cache_dir=",
                 "source=images", f"source.path={tmp_path / 'img'}", f"live.atlas={root}",
                 "live.layer=conv1", "live.on_demand.enabled=false", "live.max_frames=8", "live.keys=[l]",
                 f"live.stats={stats}")
    assert r.returncode == 0, r.stderr
    s = json.loads(stats.read_text())
    assert s["unit"] == 1 and s["pane"]["missing"] == ["regularized_opt", "max_im", "max_deconv"]
