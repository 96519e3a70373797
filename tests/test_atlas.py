"""The unit atlas: top-k mining against a brute-force computation on real photos (the embedded
model and a Caffe model), receptive fields on CaffeNet's architecture against the analytic
values, resume after an interruption, unreadable files, the on-disk layout and the CLI."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import deepvis_repro as dv
from deepvis_repro.atlas import mine, receptive_field
from deepvis_repro.atlas.corpus import BatchDecoder, DEMO_VIEWS, folder_corpus, list_corpus, video_corpus
from deepvis_repro.atlas.mining import load_result
from deepvis_repro.atlas.receptive import layer_geometry
from deepvis_repro.errors import DeepvisError
from caffe_models import caffenet_geometry, caffenet_shaped, random_weights, write_model

PLUGINS = Path(__file__).resolve().parent / "plugins"

ANALYTIC_CAFFENET = {"conv1": 11, "pool1": 19, "norm1": 19, "conv2": 51, "pool2": 67, "norm2": 67,
                     "conv3": 99, "conv4": 131, "conv5": 163, "pool5": 195}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, photos):
    """Real photos (crops of scikit-image's samples) in a two-level tree, and three bad files."""
    d = tmp_path_factory.mktemp("corpus")
    for name, img in photos.items():
        (d / name).mkdir()
        h, w = img.shape[:2]
        for v, (t, l, b, r) in enumerate(DEMO_VIEWS[:6]):
            Image.fromarray(img[int(t * h):int(b * h), int(l * w):int(r * w)]).save(d / name / f"{v}.jpg", quality=92)
    (d / "coffee" / "broken.jpg").write_bytes((d / "coffee" / "0.jpg").read_bytes()[:300])  # truncated
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("not an image")
    return d


def brute_force(backend, items, layers, k, batch_size, largest=True):
    """Every activation kept: per image and channel the spatial max (or min) and its first
    position; then sorted by value, ties by image id. Unreadable images are left out."""
    dec = BatchDecoder(backend.view_spec())
    entries = {l: [] for l in layers}  # (channel, value, id, y, x)
    for s in range(0, len(items), batch_size):
        d = dec(items[s:s + batch_size])
        x = torch.from_numpy(d["images"]).permute(0, 3, 1, 2).float() - backend.mean_image()
        with torch.no_grad():
            acts = backend.forward(x, layers)
        for l in layers:
            a = acts[l].numpy()
            flat = a.reshape(a.shape[0], a.shape[1], -1)
            w = a.shape[-1] if a.ndim == 4 else 1
            arg = flat.argmax(2) if largest else flat.argmin(2)
            for j in range(a.shape[0]):
                if not d["ok"][j]:
                    continue
                for c in range(a.shape[1]):
                    v = flat[j, c, arg[j, c]]
                    entries[l].append((c, float(v), s + j, int(arg[j, c]) // w, int(arg[j, c]) % w))
    out = {}
    for l in layers:
        C = max(e[0] for e in entries[l]) + 1
        vals, ids, pos = np.zeros((C, k), np.float32), np.zeros((C, k), np.int64), np.zeros((C, k, 2), np.int32)
        for c in range(C):
            es = sorted((e for e in entries[l] if e[0] == c), key=lambda e: ((-e[1] if largest else e[1]), e[2]))[:k]
            vals[c] = [e[1] for e in es]
            ids[c] = [e[2] for e in es]
            pos[c] = [(e[3], e[4]) for e in es]
        out[l] = (vals, ids, pos)
    return out


def assert_same(result, reference, layers, prefix=""):
    for l in layers:
        v, i, p = reference[l]
        np.testing.assert_array_equal(getattr(result, f"{prefix}image_ids")[l], i, err_msg=l)
        np.testing.assert_array_equal(getattr(result, f"{prefix}values")[l], v, err_msg=l)
        np.testing.assert_array_equal(getattr(result, f"{prefix}positions")[l], p, err_msg=l)


def test_embedded_model_mining_equals_brute_force(lite0, corpus_dir):
    corpus = folder_corpus(str(corpus_dir))
    assert len(corpus) == 27  # 24 photos and 3 bad files, in sorted path order
    layers = ["stem", "blocks.3", "blocks.10", "head", "fc", "prob"]
    r = mine(lite0, corpus, layers, top_k=9, batch_size=8, negatives=True, progress=False)
    assert r.complete and r.paths == corpus.items and r.layers == layers
    assert r.values["fc"].shape == (1000, 9) and r.positions["blocks.3"].shape == (40, 9, 2)
    assert np.all(np.diff(r.values["blocks.10"], axis=1) <= 0)  # descending
    assert_same(r, brute_force(lite0, corpus.items, layers, 9, 8), layers)
    assert_same(r, brute_force(lite0, corpus.items, layers, 9, 8, largest=False), layers, "min_")
    assert np.all(r.positions["fc"] == 0)
    # the unreadable files are skipped and named, never picked
    bad = {os.path.basename(p) for _, p, _ in r.skipped}
    assert bad == {"broken.jpg", "empty.png", "text.jpg"}
    bad_ids = {i for i, _, _ in r.skipped}
    assert not bad_ids & set(r.image_ids["fc"].flatten().tolist())
    # what the model calls an espresso is in the coffee photo's crops
    top = [os.path.basename(os.path.dirname(r.paths[i])) for i in r.image_ids["fc"][967][:3]]
    assert top.count("coffee") >= 2, top


def test_caffe_model_mining_equals_brute_force(corpus_dir, tmp_path):
    layers_def, size = caffenet_shaped()
    blobs, _ = random_weights(layers_def, size, seed=3)
    proto, weights = write_model(layers_def, size, blobs, tmp_path)
    b = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir="")
    items = folder_corpus(str(corpus_dir)).items
    layers = ["conv1", "pool2", "conv5", "fc7", "prob"]
    r = mine(b, items, layers, top_k=5, batch_size=6, progress=False)
    assert_same(r, brute_force(b, items, layers, 5, 6), layers)


def test_fewer_images_than_k_leaves_empty_slots(lite0, corpus_dir):
    items = sorted(str(p) for p in (corpus_dir / "rocket").glob("*.jpg"))[:3]
    r = mine(lite0, items, ["blocks.0"], top_k=5, progress=False)
    assert (r.image_ids["blocks.0"][:, :3] >= 0).all() and (r.image_ids["blocks.0"][:, 3:] == -1).all()
    assert np.isnan(r.values["blocks.0"][:, 3:]).all()


@pytest.fixture(scope="module")
def caffenet_arch(tmp_path_factory):
    """CaffeNet's layer geometry, as its shipped prototxt, with few channels and random weights."""
    from deepvis_repro_backends.caffe_backend import caffenet_prototxt
    from deepvis_repro_backends.caffe_net import read_prototxt

    d = tmp_path_factory.mktemp("caffenet_arch")
    layers_def, size = caffenet_geometry()
    blobs, _ = random_weights(layers_def, size, seed=5)
    proto, weights = write_model(layers_def, size, blobs, d)
    ours = {l.name: l for l in read_prototxt(str(proto)).layer}
    for real in read_prototxt(caffenet_prototxt()).layer:  # the same geometry as the paper's file
        p, q = real.convolution_param, ours[real.name].convolution_param
        assert (list(p.kernel_size), list(p.stride), list(p.pad), p.group) == \
            (list(q.kernel_size), list(q.stride), list(q.pad), q.group), real.name
        p, q = real.pooling_param, ours[real.name].pooling_param
        assert (p.kernel_size, p.stride, p.pool) == (q.kernel_size, q.stride, q.pool), real.name
    return dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir="")


def test_receptive_fields_on_caffenet_equal_the_analytic_values(caffenet_arch):
    b = caffenet_arch
    for layer, size in ANALYTIC_CAFFENET.items():
        g = layer_geometry(b, layer)
        assert (g.size_y, g.size_x) == (size, size), (layer, g)
        assert not g.clipped
    # strides and offsets: conv5's unit i sees [16 i - 64, 16 i + 99)
    assert receptive_field(b, "conv5", 0, 0) == (-64, -64, 99, 99)
    assert receptive_field(b, "conv5", 6, 2) == (32, -32, 195, 131)
    assert receptive_field(b, "conv1", 54, 54) == (216, 216, 227, 227)
    assert receptive_field(b, "pool5", 5, 5) == (96, 96, 291, 291)  # reaches past the image
    for fc in ("fc6", "fc7", "fc8", "prob"):
        assert receptive_field(b, fc, 0, 0) == (0, 0, 227, 227)


def test_dead_units_do_not_hide_the_field(caffenet_arch, tmp_path):
    """All-negative weights in conv1 kill every ReLU after it; the field is unchanged."""
    b = caffenet_arch
    conv1 = b.module.layers_["l0_conv1"]
    saved = conv1.weight.detach().clone(), conv1.bias.detach().clone()
    try:
        with torch.no_grad():
            conv1.weight.copy_(-saved[0].abs())
            conv1.bias.fill_(-1.0)
        b.cache("receptive_fields").clear()
        assert layer_geometry(b, "conv3").size_y == 99
    finally:
        with torch.no_grad():
            conv1.weight.copy_(saved[0])
            conv1.bias.copy_(saved[1])
        b.cache("receptive_fields").clear()


def test_receptive_fields_on_a_branching_model(lite0):
    """EfficientNet (residual branches, TF 'same' padding): the stem's 3x3 stride-2 conv and
    growing fields, every unit's box a shift of its neighbour's."""
    assert receptive_field(lite0, "stem", 0, 0) == (0, 0, 3, 3)
    assert receptive_field(lite0, "stem", 5, 7) == (10, 14, 13, 17)
    sizes = [layer_geometry(lite0, l).size_y for l in ("blocks.0", "blocks.3", "blocks.5")]
    assert sizes == sorted(sizes) and sizes[0] == 7
    t, l, b_, r = receptive_field(lite0, "blocks.5", 3, 4)
    t2, l2, _, _ = receptive_field(lite0, "blocks.5", 4, 6)
    assert (t2 - t, l2 - l) == (16, 32) and b_ - t == r - l == sizes[2]
    assert receptive_field(lite0, "fc", 0, 0) == (0, 0, 224, 224)


class StopAfter:
    """An engine that stops (as Ctrl-C would) after n batches."""

    def __init__(self, n):
        from deepvis_repro.atlas.engine import LocalEngine

        self.inner, self.n, self.name = LocalEngine(workers=0), n, "local"

    def run(self, job, todo):
        for i, out in enumerate(self.inner.run(job, todo)):
            if i == self.n:
                raise KeyboardInterrupt
            yield out


def test_resume_after_interruption_gives_the_uninterrupted_result(lite0, corpus_dir, tmp_path):
    items = folder_corpus(str(corpus_dir)).items
    layers = ["blocks.2", "blocks.12", "fc"]
    whole = mine(lite0, items, layers, top_k=4, batch_size=4, progress=False, atlas_dir=tmp_path / "a")
    part = mine(lite0, items, layers, top_k=4, batch_size=4, progress=False, atlas_dir=tmp_path / "b",
                engine=StopAfter(3))
    assert not part.complete and part.images_done == 12
    assert (tmp_path / "b" / "checkpoint" / "mining.npz").is_file()
    again = mine(lite0, items, layers, top_k=4, batch_size=4, progress=False, atlas_dir=tmp_path / "b",
                 engine=StopAfter(2))  # interrupted a second time
    assert again.images_done == 20
    done = mine(lite0, items, layers, top_k=4, batch_size=4, progress=False, atlas_dir=tmp_path / "b")
    assert done.complete and not (tmp_path / "b" / "checkpoint" / "mining.npz").exists()
    for l in layers:
        for a in ("values", "image_ids", "positions"):
            np.testing.assert_array_equal(getattr(done, a)[l], getattr(whole, a)[l])
    back = load_result(tmp_path / "b")
    np.testing.assert_array_equal(back.image_ids["fc"], whole.image_ids["fc"])
    assert [p for _, p, _ in back.skipped] == [p for _, p, _ in whole.skipped]


def test_a_different_model_or_corpus_is_refused(lite0, corpus_dir, tmp_path):
    items = folder_corpus(str(corpus_dir)).items
    mine(lite0, items[:8], ["blocks.1"], top_k=2, progress=False, atlas_dir=tmp_path)
    with pytest.raises(DeepvisError, match="another corpus .* refusing to mix"):
        mine(lite0, items[:9], ["blocks.1"], top_k=2, progress=False, atlas_dir=tmp_path)
    with pytest.raises(DeepvisError, match="was mined with layers"):
        mine(lite0, items[:8], ["blocks.2"], top_k=2, progress=False, atlas_dir=tmp_path)
    with pytest.raises(DeepvisError, match="was mined with numerics default .this run: bf16"):
        mine(lite0, items[:8], ["blocks.1"], top_k=2, progress=False, atlas_dir=tmp_path, numerics="bf16")
    other = dv.load_backend(fuse_bn=False)  # the same function, other weights in the file: refused
    with pytest.raises(DeepvisError, match="another model"):
        mine(other, items[:8], ["blocks.1"], top_k=2, progress=False, atlas_dir=tmp_path)


def test_list_and_video_corpora(lite0, corpus_dir, tmp_path, photos):
    from conftest import write_video

    (tmp_path / "list.txt").write_text("# a comment\ncoffee/0.jpg\n\n" + str(corpus_dir / "rocket" / "1.jpg") + "\n")
    os.symlink(corpus_dir / "coffee", tmp_path / "coffee")
    c = list_corpus(str(tmp_path / "list.txt"))
    assert [os.path.basename(p) for p in c.items] == ["0.jpg", "1.jpg"]
    path = write_video(tmp_path / "pan.mp4", photos["astronaut"], frames=30, size=128, step=8, top=200)
    v = video_corpus(str(path), every=2)
    assert len(v) == 15 and v.items[1].endswith("#frame=2")
    r = mine(lite0, v, ["blocks.1"], top_k=3, batch_size=4, progress=False)
    assert not r.skipped
    # decoding a batch that starts mid-video (a seek) gives the same frames as decoding from 0
    dec = BatchDecoder(lite0.view_spec())
    late = dec(v.items[8:10])["images"]
    assert np.abs(late.astype(int) - dec(v.items[:10])["images"][8:10].astype(int)).max() == 0


def test_montages_and_layout(lite0, corpus_dir, tmp_path):
    from deepvis_repro.atlas.patches import render_montages
    from deepvis_repro.atlas.store import AtlasStore

    items = folder_corpus(str(corpus_dir)).items
    mine(lite0, items, ["blocks.4", "fc"], top_k=9, progress=False, atlas_dir=tmp_path)
    n = render_montages(lite0, tmp_path, units=[0, 5], progress=False)
    assert n == {"blocks.4": 2, "fc": 2}
    st = AtlasStore(tmp_path)
    m = st.manifest()
    g = m["layers"]["blocks.4"]["receptive_field"]
    assert g["size_y"] == layer_geometry(lite0, "blocks.4").size_y == 67
    tile = m["layers"]["blocks.4"]["tile"]
    for kind in ("max_im", "max_deconv"):
        im = np.asarray(Image.open(st.unit_file(kind, "blocks.4", 5)))
        assert im.shape == (3 * tile + 8, 3 * tile + 8, 3)  # 3x3 tiles, 2 px borders
    # the first patch is the field around the unit's maximum in the top image, as the net saw it
    a = st.layer_arrays("blocks.4")
    view = BatchDecoder(lite0.view_spec())([items[a["image_ids"][5, 0]]])["images"][0]
    from deepvis_repro.atlas.receptive import crop_box
    patch = crop_box(view, receptive_field(lite0, "blocks.4", *a["positions"][5, 0]))
    shown = np.asarray(Image.open(st.unit_file("max_im", "blocks.4", 5)))[2:2 + tile, 2:2 + tile]
    want = np.asarray(Image.fromarray(patch).resize((tile, tile), Image.BILINEAR))
    assert np.abs(shown.astype(int) - want.astype(int)).mean() < 6  # JPEG
    # guided backprop (auto on a model without max-pooling) differs between patches
    dec = np.asarray(Image.open(st.unit_file("max_deconv", "fc", 5))).astype(int)
    assert np.abs(dec[2:2 + 50, 2:2 + 50] - dec[4 + tile:4 + tile + 50, 2:2 + 50]).mean() > 1
    assert m["montages"]["fc"]["mode"] == "guided"
    # issue 34: a killed montage phase's temporaries do not outlive the resume; one writer at a time
    stale = tmp_path / "max_im" / "fc" / ".fc_0006.jpg.x1y2.partial"
    stale.write_bytes(b"half a jpeg")
    with st.writer():
        with pytest.raises(DeepvisError, match="in use by another run"):
            render_montages(lite0, tmp_path, units=[6], progress=False)
    assert stale.exists()  # the refused run touched nothing
    again = render_montages(lite0, tmp_path, units=[0, 5, 6], progress=False)  # resumes
    assert again == {"blocks.4": 1, "fc": 1}
    assert not stale.exists()
    assert not [p for p in tmp_path.rglob("*.partial")]


@pytest.mark.parametrize("layer", ["blocks.5", "fc"])
def test_shared_forward_backprop_equals_one_pass_per_pair(lite0, photos, layer):
    """Montages share each image's forward pass among the units that list it: every pair's
    gradient is still the one a separate forward and backward pass gives (guided backprop,
    one-hot seed), whatever the grouping (3 images at a time, images with 1 to 5 pairs)."""
    from deepvis_repro.atlas.patches import shared_backprop
    from deepvis_repro.backprop import relu_backward

    views = {i: np.asarray(Image.fromarray(photos[n]).resize((224, 224))) for i, n in enumerate(sorted(photos))}
    rng = np.random.default_rng(1)
    pairs = [(int(rng.integers(4)), int(rng.integers(40)), (int(rng.integers(14)), int(rng.integers(14))))
             for _ in range(12)]
    got = {}
    shared_backprop(lite0, views, pairs, layer, got.__setitem__, "guided", images=3)
    assert sorted(got) == list(range(len(pairs)))
    mean = lite0.mean_image().unsqueeze(0)
    for k, (i, c, (y, x)) in enumerate(pairs):
        inp = (torch.from_numpy(views[i]).permute(2, 0, 1)[None].float() - mean).requires_grad_(True)
        with relu_backward(lite0.module, "guided"):
            a = lite0.forward(inp, [layer])[layer]
            seed = torch.zeros_like(a)
            seed[(0, c, y, x) if a.dim() == 4 else (0, c)] = 1.0
            (want,) = torch.autograd.grad(a, inp, seed)
        want = want[0].permute(1, 2, 0).numpy()
        assert got[k].shape == want.shape
        assert np.abs(got[k] - want).max() <= 1e-4 * np.abs(want).max(), (layer, k)


def test_deconv_tiles_scale_by_numpys_percentile(lite0, photos):
    """A deconv tile's scale (the 99th percentile of |gradient|) is found from two order
    statistics instead of np.percentile's whole float64 sort: the very same value on the real
    gradients of the photos (fc and blocks.5, guided) and on arrays built to defeat the shortcut
    (sorted, all ties, mostly zeros, a NaN, too small for it), at any percentile; the tile's grey
    levels are those of the float64 formula within one level, at any scale; a NaN pixel is
    drawn grey."""
    from deepvis_repro.atlas.patches import abs_percentile, render_signed, shared_backprop

    views = {i: np.asarray(Image.fromarray(photos[n]).resize((224, 224))) for i, n in enumerate(sorted(photos))}
    grads = []
    for layer in ("fc", "blocks.5"):
        pairs = [(i, c, (5, 6)) for i in range(4) for c in (0, 7)]
        shared_backprop(lite0, views, pairs, layer, lambda k, g: grads.append(g.copy()), "guided", images=4)
    rng = np.random.default_rng(0)
    sorted_up = np.sort(rng.standard_normal(150528)).astype(np.float32)
    mostly_zero = np.where(rng.random(150528) < 0.999, 0, rng.standard_normal(150528)).astype(np.float32)
    with_nan = grads[0].copy()
    with_nan[3, 4, 1] = np.nan
    odd = [sorted_up, np.ones(50000, np.float32), mostly_zero, with_nan, grads[1][:20, :30]]
    for a in grads + odd:
        for pct in (99.0, 99.9, 50.0, 100.0, 0.0):
            want = np.percentile(np.abs(np.asarray(a, np.float64)), pct)
            got = abs_percentile(a, pct)
            assert got == want or (np.isnan(want) and np.isnan(got)), (a.shape, pct, got, want)
    tiny = grads[0] * np.float32(1e-37 / np.abs(grads[0]).max())  # a scale near float32's smallest
    for g in grads + [tiny]:
        m = np.percentile(np.abs(g.astype(np.float64)), 99)
        want = np.clip(np.round(127.5 + 127.5 * g.astype(np.float64) / m), 0, 255)
        assert np.abs(render_signed(g).astype(int) - want).max() <= 1
    tile = render_signed(with_nan)  # a NaN pixel drawn grey, the others as without it
    assert tile[3, 4, 1] == 128 and np.array_equal(np.delete(tile.ravel(), 3 * 224 * 3 + 4 * 3 + 1),
                                                   np.delete(render_signed(np.nan_to_num(with_nan)).ravel(), 3 * 224 * 3 + 4 * 3 + 1))


def run_mine(*args, timeout=600, **kw):
    return subprocess.run(["deepvis-mine", *args], capture_output=True, text=True, timeout=timeout, **kw)


def test_cli_mines_reports_and_resumes_after_sigkill(corpus_dir, tmp_path):
    args = [f"corpus.path={corpus_dir}", "layers=[blocks.1,blocks.6,fc]", "top_k=3", "batch_size=2",
            "montages=false", "engine.workers=0"]
    ref = run_mine(*args, f"atlas.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr
    assert "3 unreadable image(s) skipped" in ref.stderr and "skipped.tsv" in ref.stderr
    assert "mined 27 images over 3 layer(s)" in ref.stdout
    skipped = (tmp_path / "ref" / "skipped.tsv").read_text()
    assert "empty.png" in skipped and "broken.jpg" in skipped
    # killed (SIGKILL: no cleanup) while mining with a checkpoint after every batch: every write
    # is slowed and announced, and the kill comes while the second checkpoint is being written (an
    # event, not a delay: however fast the machine, the run is then past its first batch and
    # cannot have finished)
    p = subprocess.Popen([sys.executable, str(PLUGINS / "slow_writes.py"), "mine", *args,
                          f"atlas.dir={tmp_path / 'k'}", "checkpoint_seconds=0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "SLOW_WRITE_SECONDS": "1"})
    checkpoints = 0
    for line in p.stderr:
        checkpoints += line.startswith("WRITING") and line.rstrip().endswith("mining.npz")
        if checkpoints == 2:
            break
    p.kill()
    p.wait()
    assert checkpoints == 2
    with np.load(tmp_path / "k" / "checkpoint" / "mining.npz") as z:
        assert 0 < z["done"].sum() < len(z["done"])
    r = run_mine(*args, f"atlas.dir={tmp_path / 'k'}")
    assert r.returncode == 0, r.stderr
    for layer in ("blocks.1", "blocks.6", "fc"):
        with np.load(tmp_path / "ref" / "layers" / f"{layer}.npz") as a, \
                np.load(tmp_path / "k" / "layers" / f"{layer}.npz") as b:
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
    # Ctrl-C: exit 130, a checkpoint, and the way to continue (a longer corpus: a list that
    # names the photos 30 times)
    photos = sorted(str(p) for p in corpus_dir.rglob("*.jpg"))
    (tmp_path / "long.txt").write_text("\n".join(photos * 30))
    long_args = [a if not a.startswith("corpus.path") else f"corpus.path={tmp_path / 'long.txt'}" for a in args]
    p = subprocess.Popen(["deepvis-mine", *long_args, f"atlas.dir={tmp_path / 'c'}", "checkpoint_seconds=1000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    t = time.time()
    while "mine 3 layer(s)" not in seen and time.time() - t < 240:
        seen += p.stderr.readline()
    time.sleep(2.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "rerun the same command to continue" in err
    assert (tmp_path / "c" / "checkpoint" / "mining.npz").is_file()
    # the same atlas with another corpus: one line, exit 2
    r = run_mine(f"corpus.path={corpus_dir / 'coffee'}", "layers=[blocks.1,blocks.6,fc]", "top_k=3",
                 "batch_size=2", f"atlas.dir={tmp_path / 'ref'}")
    assert r.returncode == 2 and "refusing to mix" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, msg", [
    (["corpus.path=/no/such/dir"], "corpus not found: /no/such/dir"),
    (["top_k=abc"], "top_k must be a whole number"),
    (["top_k=0"], "top_k must be at least 1"),
    (["layers=[nope]"], "unknown layer 'nope'"),
    (["engine=spark"], "unknown engine 'spark'"),
    (["deconv=sideways", "layers=[fc]"], "deconv mode must be"),
])
def test_cli_user_errors(args, msg, tmp_path, corpus_dir):
    base = [f"corpus.path={corpus_dir / 'rocket'}"] if not any(a.startswith("corpus") for a in args) else []
    r = run_mine(*base, *args, f"atlas.dir={tmp_path / 'a'}", "engine.workers=0" if "engine=spark" not in args else "top_k=2")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_ray_engine_equals_local(lite0, corpus_dir, tmp_path):
    pytest.importorskip("ray.data")
    items = folder_corpus(str(corpus_dir)).items
    layers = ["blocks.2", "blocks.9", "fc"]
    local = mine(lite0, items, layers, top_k=5, batch_size=4, negatives=True, progress=False)
    remote = mine(lite0, items, layers, top_k=5, batch_size=4, negatives=True, progress=False, engine="ray",
                  engine_options={"actors": 1, "num_cpus": 0.5, "decode_cpus": 0.5,
                                  "object_store_memory": 150_000_000})
    for l in layers:
        for a in ("values", "image_ids", "positions", "min_values", "min_image_ids", "min_positions"):
            np.testing.assert_array_equal(getattr(remote, a)[l], getattr(local, a)[l], err_msg=f"{l} {a}")
    assert [p for _, p, _ in remote.skipped] == [p for _, p, _ in local.skipped]


def test_every_units_optimized_image_on_ray_equals_local(lite0, tmp_path):
    pytest.importorskip("ray.data")
    from deepvis_repro.atlas.optimized import optimize_into_atlas

    units = ["blocks.2:all"]
    local = optimize_into_atlas(lite0, tmp_path / "local", units, steps=3, batch_size=8, progress=False)
    remote = optimize_into_atlas(lite0, tmp_path / "ray", units, steps=3, batch_size=8, progress=False, engine="ray",
                                 engine_options={"actors": 2, "num_cpus": 0.5, "object_store_memory": 150_000_000})
    assert local["written"] == remote["written"] == 24
    a = sorted((tmp_path / "local" / "regularized_opt" / "blocks.2").glob("*.jpg"))
    b = sorted((tmp_path / "ray" / "regularized_opt" / "blocks.2").glob("*.jpg"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 25
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_a_unit_whose_record_was_lost_is_done_again(lite0, tmp_path):
    """Issue 21: a death after a batch's images were written but before its records were saved
    left the batch counted as done. Done means image and record."""
    import json

    from deepvis_repro.atlas.optimized import optimize_into_atlas

    units = ["blocks.2:0", "blocks.2:1", "blocks.2:2", "blocks.2:3"]
    first = optimize_into_atlas(lite0, tmp_path, units, steps=2, batch_size=2, progress=False)
    assert first["written"] == 4
    results = tmp_path / "regularized_opt" / "blocks.2" / "results.json"
    data = json.loads(results.read_text())
    for c in ("2", "3"):  # the second batch's records never reached the disk
        del data["units"][c]
    results.write_text(json.dumps(data))
    again = optimize_into_atlas(lite0, tmp_path, units, steps=2, batch_size=2, progress=False)
    assert again["written"] == 2 and again["skipped"] == 2
    assert set(json.loads(results.read_text())["units"]) == {"0", "1", "2", "3"}


def test_a_second_writer_of_an_atlas_is_refused_naming_the_first(lite0, tmp_path, photos):
    """Issue 21: two identical runs on one atlas.dir; the second deleted the first's checkpoint."""
    import os

    from deepvis_repro.atlas.mining import mine
    from deepvis_repro.atlas.optimized import optimize_into_atlas
    from deepvis_repro.atlas.store import AtlasStore
    from deepvis_repro.errors import DeepvisError

    from PIL import Image

    Image.fromarray(photos["coffee"]).save(tmp_path / "c.png")
    atlas = tmp_path / "A"
    with AtlasStore(atlas).writer():
        with pytest.raises(DeepvisError, match=f"in use by another run \\(process {os.getpid()}\\)"):
            mine(lite0, [str(tmp_path / "c.png")], ["fc"], atlas_dir=atlas, progress=False)
        with pytest.raises(DeepvisError, match="in use by another run"):
            optimize_into_atlas(lite0, atlas, ["fc:1"], steps=1, progress=False)
    # released: the next writer goes ahead
    assert optimize_into_atlas(lite0, atlas, ["fc:1"], steps=1, progress=False)["written"] == 1


def test_hand_edited_atlas_state_is_refused(lite0, corpus_dir, tmp_path):
    """Issue 21: a checkpoint with every 'done' flag set finished with a partial result, and a
    layer file cut to 4 channels was accepted. Both carry a digest now, checked on load."""
    from deepvis_repro.errors import DeepvisError
    from deepvis_repro.files import save_npz

    items = folder_corpus(str(corpus_dir)).items
    part = mine(lite0, items, ["blocks.2", "fc"], top_k=4, batch_size=4, progress=False, atlas_dir=tmp_path / "a",
                engine=StopAfter(2))
    assert not part.complete
    ck = tmp_path / "a" / "checkpoint" / "mining.npz"
    with np.load(ck) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["done"][:] = True  # "every batch done", by hand
    save_npz(ck, **arrays)
    with pytest.raises(DeepvisError, match="checkpoint is unusable .*does not match its digest"):
        mine(lite0, items, ["blocks.2", "fc"], top_k=4, batch_size=4, progress=False, atlas_dir=tmp_path / "a")
    whole = mine(lite0, items, ["blocks.2", "fc"], top_k=4, batch_size=4, progress=False, atlas_dir=tmp_path / "b")
    layer = tmp_path / "b" / "layers"
    (f,) = [p for p in layer.iterdir() if p.name.startswith("blocks.2")]
    with np.load(f) as z:
        cut = {k: (z[k][:4] if z[k].ndim and k != "_sha256" else z[k]) for k in z.files}
    from deepvis_repro.files import save_sealed_npz
    cut.pop("_sha256")
    save_sealed_npz(f, **cut)  # re-sealed by hand: its own digest fits, the manifest's does not
    with pytest.raises(DeepvisError, match="does not match its digest"):
        load_result(tmp_path / "b")
    assert whole.values["blocks.2"].shape[0] > 4


def test_a_damaged_demo_corpus_is_written_again(tmp_path):
    """Issue 21: a demo-corpus file truncated or deleted, the marker kept, was mined as it was
    (399 images), and the demo atlas then refused as 'another corpus'."""
    from deepvis_repro.atlas.corpus import demo_corpus

    folder = tmp_path / "demo"
    first = demo_corpus(str(folder))
    assert len(first.items) == 400
    victim, gone = folder / "coffee_03.png", folder / "rocket_05_m.png"
    good = victim.read_bytes()
    victim.write_bytes(good[:500])
    gone.unlink()
    again = demo_corpus(str(folder))
    assert again.items == first.items and victim.read_bytes() == good and gone.is_file()


def test_a_truncated_optimized_picture_is_made_again(lite0, tmp_path):
    """Issue 21: a truncated optimized JPEG made write_sprite raise and was never repaired."""
    from PIL import Image

    from deepvis_repro.atlas.optimized import optimize_into_atlas

    units = ["blocks.2:0", "blocks.2:1"]
    optimize_into_atlas(lite0, tmp_path, units, steps=2, batch_size=1, progress=False)
    pic = tmp_path / "regularized_opt" / "blocks.2" / "blocks.2_0001.jpg"
    whole = pic.read_bytes()
    pic.write_bytes(whole[:len(whole) // 3])
    again = optimize_into_atlas(lite0, tmp_path, units, steps=2, batch_size=1, progress=False)
    assert again["written"] == 1 and pic.read_bytes() == whole  # the same picture, whole again
    with Image.open(tmp_path / "regularized_opt" / "blocks.2" / "whole_layer.jpg") as im:
        im.load()
