"""The caffe and caffenet backends on Caffe models built here (random weights), every blob
checked against an independent numpy reference of Caffe's semantics."""
import subprocess
import time

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import deepvis_repro as dv
from deepvis_repro.layout import canonical
from deepvis_repro.errors import DeepvisError
from deepvis_repro.optimize import optimize
from caffe_models import (activations_shaped, caffenet_shaped, model_files, random_weights, reference_blobs,
                          resnet_shaped, shaping_shaped, write_model)


def blob_order(layers):
    order = []
    for _, _, _, tops, _, _ in layers:
        for t in tops:
            if t not in order:
                order.append(t)
    return order


@pytest.fixture(scope="module")
def caffenet_files(tmp_path_factory):
    return model_files(caffenet_shaped, 1, tmp_path_factory.mktemp("caffenet"))


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory):
    return model_files(resnet_shaped, 2, tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="module")
def activations_files(tmp_path_factory):
    return model_files(activations_shaped, 4, tmp_path_factory.mktemp("activations"))


@pytest.fixture(scope="module")
def shaping_files(tmp_path_factory):
    return model_files(shaping_shaped, 7, tmp_path_factory.mktemp("shaping"))


@pytest.mark.parametrize("files", ["caffenet_files", "resnet_files", "activations_files", "shaping_files"])
def test_every_blob_matches_caffe_semantics(files, request, tmp_path):
    layers, size, blobs, proto, weights = request.getfixturevalue(files)
    b = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), mean=[104, 117, 123],
                        cache_dir=str(tmp_path))
    assert b.layers == blob_order(layers)  # Caffe's blob names, in order, incl. its own 'prob'
    assert b.input_size == (size, size)
    rgb = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3))
    x = torch.tensor(rgb, dtype=torch.float32).permute(0, 3, 1, 2) - b.mean
    bgr = rgb[..., ::-1].transpose(0, 3, 1, 2) - np.array([104, 117, 123]).reshape(1, 3, 1, 1)
    want = reference_blobs(layers, blobs, bgr)
    with torch.no_grad():
        got = b.forward(x, b.layers)
    for name in b.layers:
        g, w = got[name].double().numpy(), want[name]
        lay = b.layer_layout(name)
        if lay.kind in ("hwc", "tokens"):  # a Permute to channels-last, a reshape of it: shown as the map it is
            w = canonical(torch.from_numpy(np.ascontiguousarray(w)), lay)[0].numpy()
        if w.ndim == 3:  # (N, C, L): shown as a one-row map (N, C, 1, L), the same values
            assert g.shape == (w.shape[0], w.shape[1], 1, w.shape[2]), name
            g = g.reshape(w.shape)
        assert g.shape == w.shape, name
        scale = max(np.abs(w).max(), 1e-6)
        assert np.abs(g - w).max() / scale < 2e-5, name
    if files == "caffenet_files":  # in-place ReLU: the conv1 blob is rectified, as in Caffe
        assert float(got["conv1"].min()) == 0.0
        assert got["pool1"].shape[-1] == 16  # ceil mode (floor would give 15)


def test_cache_makes_the_second_load_fast_and_identical(caffenet_files, tmp_path):
    _, size, _, proto, weights = caffenet_files
    t = time.perf_counter()
    a = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=str(tmp_path))
    first = time.perf_counter() - t
    assert len(list(tmp_path.glob("*.pt"))) == 1
    b = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=str(tmp_path))
    x = torch.randn(1, 3, size, size) * 50
    with torch.no_grad():
        assert torch.equal(a.forward(x, ["fc8"])["fc8"], b.forward(x, ["fc8"])["fc8"])
    assert first >= 0


def test_optimizer_and_backprop_take_the_caffe_backend(caffenet_files, tmp_path):
    _, _, _, proto, weights = caffenet_files
    b = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=str(tmp_path))
    r = optimize(b, ["fc8:3", "conv3:5"], preset="paper_3", steps=15, progress=False)
    assert np.all(r.best_activation > r.history[0] + 1e-3)
    from deepvis_repro.backprop import backprop

    for mode in ("gradient", "deconv", "guided"):
        g, _, _ = backprop(b, b.preprocess(np.full((80, 80, 3), 128, np.uint8)), "conv5", 2, mode)
        assert g.shape == (3, 69, 69) and torch.isfinite(g).all()


def test_mean_file_npy_and_binaryproto(caffenet_files, tmp_path):
    from deepvis_repro_backends import caffe_proto

    _, size, _, proto, weights = caffenet_files
    mean = np.stack([np.full((80, 80), v, np.float32) for v in (104, 117, 123)])  # BGR
    mean[0, 40, 40] = 7
    np.save(tmp_path / "mean.npy", mean)
    blob = caffe_proto.BlobProto()
    blob.shape.dim.extend([1, 3, 80, 80])
    blob.data.extend(mean.reshape(-1).tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    for f in ("mean.npy", "mean.binaryproto"):
        b = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), mean=str(tmp_path / f),
                            cache_dir=str(tmp_path))
        assert b.mean.shape == (3, size, size)
        assert float(b.mean[2, 0, 0]) == 104 and float(b.mean[0, 0, 0]) == 123  # RGB now
        off = (80 - size) // 2
        assert float(b.mean[2, 40 - off, 40 - off]) == 7  # centre crop kept the marked pixel


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_bad_inputs_are_clear_errors(caffenet_files, tmp_path):
    _, _, _, proto, weights = caffenet_files
    data = weights.read_bytes()
    trunc = tmp_path / "trunc.caffemodel"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeepvisError, match="is corrupt or truncated"):
        dv.load_backend("caffe", prototxt=str(proto), weights=str(trunc), cache_dir="")
    bad = tmp_path / "syntax.prototxt"
    bad.write_text(proto.read_text().replace("num_output: 16", "num_output 16 {", 1))
    with pytest.raises(DeepvisError, match=r"prototxt syntax error in .*syntax.prototxt: line \d+"):
        dv.load_backend("caffe", prototxt=str(bad), weights=str(weights), cache_dir="")
    unsup = tmp_path / "unsupported.prototxt"
    unsup.write_text(proto.read_text())
    _edit(unsup, 'type: "LRN"', 'type: "SPP"')
    with pytest.raises(DeepvisError, match="unsupported layer 'norm1' of type SPP"):
        dv.load_backend("caffe", prototxt=str(unsup), weights=str(weights), cache_dir="")
    shapes = tmp_path / "shapes.prototxt"
    shapes.write_text(proto.read_text())
    _edit(shapes, "num_output: 16", "num_output: 20")
    with pytest.raises(DeepvisError, match=r"layer 'conv1': weights of shape \(16, 3, 7, 7\) do not match the prototxt's \(20, 3, 7, 7\)"):
        dv.load_backend("caffe", prototxt=str(shapes), weights=str(weights), cache_dir="")
    fc = tmp_path / "fc.prototxt"  # an InnerProduct sized for another head than the caffemodel's
    fc.write_text(proto.read_text())
    _edit(fc, "num_output: 10", "num_output: 12")
    with pytest.raises(DeepvisError, match=r"layer 'fc8': its weights \(640 values, shape \(10, 64\)\) do not fit num_output 12"):
        dv.load_backend("caffe", prototxt=str(fc), weights=str(weights), cache_dir="")
    with pytest.raises(DeepvisError, match="mean file not found"):
        dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), mean=str(tmp_path / "none.npy"), cache_dir="")
    with pytest.raises(DeepvisError, match="caffemodel not found"):
        dv.load_backend("caffe", prototxt=str(proto), weights=str(tmp_path / "no.caffemodel"), cache_dir="")


def test_caffenet_sees_images_as_the_original_did():
    """Stretched to 256x256, then the centre 227 (find_maxes' caffe.Classifier, image_dims 256)."""
    from omegaconf import OmegaConf

    from deepvis_repro.registry import backend_config
    from deepvis_repro_backends.caffe_backend import CAFFENET_DEFAULTS

    # both routes (direct and via=onnx) take their defaults from this one place
    assert CAFFENET_DEFAULTS["resize"] == (256, 256) and CAFFENET_DEFAULTS["labels"] == "imagenet"
    assert OmegaConf.to_container(backend_config("caffenet"))["resize"] == [256, 256]


def test_caffenet_backend_ships_the_papers_prototxt(tmp_path):
    """The shipped prototxt is the paper's CaffeNet layout (benchmarks/bench_caffe.py loads it
    with random weights of the real shapes, 233 MB)."""
    from deepvis_repro_backends.caffe_backend import caffenet_prototxt
    from deepvis_repro_backends.caffe_net import read_prototxt

    net = read_prototxt(caffenet_prototxt())
    names = [l.name for l in net.layer]
    assert names[:5] == ["data", "conv1", "relu1", "pool1", "norm1"] and names[-1] == "prob"


def test_inspect_cli_with_caffe(caffenet_files, tmp_path):
    _, _, _, proto, weights = caffenet_files
    r = subprocess.run(["deepvis-inspect", "backend=caffe", f"backend.prototxt={proto}",
                        f"backend.weights={weights}", f"backend.cache_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "conv1" in r.stdout and "(16, 32, 32)" in r.stdout and "fc8" in r.stdout
    # the model's own channel order in the header (Caffe: BGR; the contract's images stay RGB)
    assert "BGR (images are given as RGB; swapped inside)" in r.stdout.splitlines()[0]
    # a model without a labels file still names the classes, by index, and says so once
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.png")
    r = subprocess.run(["deepvis-inspect", "backend=caffe", f"backend.prototxt={proto}",
                        f"backend.weights={weights}", f"backend.cache_dir={tmp_path}", f"image={tmp_path / 'cat.png'}",
                        "top_k=3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [l.split() for l in r.stdout.strip().splitlines()]
    assert len(rows) == 3 and all(len(x) == 3 and x[1] == x[2] for x in rows)  # index named by itself
    assert "has no labels: classes by index" in r.stderr
    r = subprocess.run(["deepvis-inspect", "backend=caffe", f"backend.prototxt={proto}",
                        f"backend.weights={tmp_path / 'x.caffemodel'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "caffemodel not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_half_precision_caffemodel_loads_its_values(caffenet_files, tmp_path):
    """A caffemodel shrunk to half precision (OpenCV's shrinkCaffeModel: BlobProto.raw_data,
    FLOAT16) is the float model with its weights rounded to half: the same outputs, bit for bit,
    as a float caffemodel of those rounded weights; a raw blob of the wrong length is one line."""
    layers, size, blobs, proto, _ = caffenet_files
    rounded = {k: [b.astype(np.float16).astype(np.float32) for b in v] for k, v in blobs.items()}
    _, half = write_model(layers, size, blobs, tmp_path, name="half", half=True)
    _, full = write_model(layers, size, rounded, tmp_path, name="rounded")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    a = dv.load_backend("caffe", prototxt=str(proto), weights=str(half), cache_dir="")
    b = dv.load_backend("caffe", prototxt=str(proto), weights=str(full), cache_dir="")
    x = torch.randn(2, 3, size, size) * 40
    with torch.no_grad():
        assert torch.equal(a.forward(x, ["fc8"])["fc8"], b.forward(x, ["fc8"])["fc8"])
    from deepvis_repro_backends import caffe_proto

    model = caffe_proto.NetParameter()
    model.ParseFromString(half.read_bytes())
    first = next(l for l in model.layer if len(l.blobs))
    first.blobs[0].raw_data = first.blobs[0].raw_data[:-3]  # a truncated blob
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(model.SerializeToString())
    with pytest.raises(DeepvisError, match=r"raw data \(\d+ bytes\) is not a whole number of float16 values"):
        dv.load_backend("caffe", prototxt=str(proto), weights=str(bad), cache_dir="")


def test_old_v1_caffemodel_loads_the_same(caffenet_files, tmp_path):
    """Old caffemodels (BVLC's own files among them) store 'layers' with legacy 4-D blobs."""
    layers, size, blobs, proto, weights = caffenet_files
    _, v1 = write_model(layers, size, blobs, tmp_path, name="v1net", v1_weights=True)
    a = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir="")
    b = dv.load_backend("caffe", prototxt=str(proto), weights=str(v1), cache_dir="")
    x = torch.randn(2, 3, size, size) * 40
    with torch.no_grad():
        assert torch.equal(a.forward(x, ["fc8"])["fc8"], b.forward(x, ["fc8"])["fc8"])


def test_live_view_takes_the_caffe_backend(caffenet_files, tmp_path, photos):
    import json
    import os

    from PIL import Image

    _, _, _, proto, weights = caffenet_files
    (tmp_path / "img").mkdir()
    Image.fromarray(photos["coffee"]).save(tmp_path / "img" / "coffee.png")
    env = dict(os.environ, SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy")
    r = subprocess.run(["deepvis-live", "backend=caffe", f"backend.prototxt={proto}", f"backend.weights={weights}",
                        f"backend.cache_dir={tmp_path}", "source=images", f"source.path={tmp_path / 'img'}",
                        "live.max_frames=15", "live.keys=[o,o,b,b]", f"live.stats={tmp_path / 's.json'}"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["layer"] == "norm1" and s["back_mode"] == "deconv" and s["net_passes"] >= 1


def test_a_detectors_backbone_with_until(tmp_path):
    """An SSD-style prototxt: a backbone, then a Permute and a layer this backend does not have
    (PriorBox). Refused in one line that names the layer and suggests until= with the blob before
    it; with until= the backbone loads (the head's layers are never built), in place layers on the
    kept blob included, and has no classes: the optimizer and the live view's pictures work."""
    layers, size = caffenet_shaped()
    cut = next(i for i, l in enumerate(layers) if l[0] == "relu5") + 1
    head = [("conv5_perm", "Permute", ["conv5"], ["conv5_perm"], {}, None),
            ("priors", "PriorBox", ["conv5", "data"], ["priors"], {}, None)]
    ssd = layers[:cut] + head
    blobs, _ = random_weights(layers[:cut], size, seed=5)
    proto, weights = write_model(ssd, size, blobs, tmp_path, name="ssd")
    with pytest.raises(DeepvisError, match=r"unsupported layer 'priors' of type PriorBox; to look at the network "
                                           r"before it, give backend.until=conv5"):
        dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir="")
    b = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir="", until="conv5",
                        labels="imagenet")
    assert b.layers[-1] == "conv5" and "prob" not in b.layers and b.labels is None
    x = torch.randn(1, 3, size, size) * 40
    with torch.no_grad():
        conv5 = b.forward(x, ["conv5"])["conv5"]
    assert float(conv5.min()) == 0.0  # relu5, in place on conv5, is kept: Caffe's blob value
    cy, cx = conv5.shape[2] // 2, conv5.shape[3] // 2
    live = int(conv5[0, :, cy, cx].argmax())  # random weights: a unit that is not dead at the centre
    r = optimize(b, [f"conv5:{live}"], preset="paper_3", steps=5, progress=False)
    assert r.stopped == {} and r.best_activation[0] > 0
    via = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=str(tmp_path / "c"),
                          until="conv5", labels="imagenet", via="onnx")  # the cut net, converted
    assert via.layers == b.layers and via.labels is None
    with torch.no_grad():
        assert torch.allclose(via.forward(x, ["conv5"])["conv5"], conv5, atol=1e-4)
    with pytest.raises(DeepvisError, match="until=conv9: the net makes no blob of that name"):
        dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir="", until="conv9")
