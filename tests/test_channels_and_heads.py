"""Issue 20: models that do not read RGB (grey, 1 channel; 4 channels) and layers with one spatial
axis (a detector's (N, C, L) head), in every tool. Values against the torch module they were
exported from, onnxruntime, or the numpy reference of Caffe's layers."""
import json
import os
import subprocess
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import deepvis_repro as dv
from deepvis_repro.errors import DeepvisError
from deepvis_repro.optimize import optimize
from deepvis_repro.units import layer_shapes
from caffe_models import caffenet_shaped, model_files, reference_blobs

ENV = dict(os.environ, SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy")


def run(cmd, *args, timeout=300):
    return subprocess.run([cmd, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def export(model, path, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(*shape),), str(path), input_names=["input"],
                          output_names=["output"], dynamo=False, opset_version=17)
    return str(path)


class GreyNet(nn.Module):
    """An OCR-style net: one input channel, a non-square 32x96 input, 5 classes."""

    def __init__(self, channels=1):
        super().__init__()
        torch.manual_seed(3)
        self.c1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(h.mean((2, 3)))


class HeadNet(nn.Module):
    """A YOLO-style head: two scales' grids flattened and joined to (N, C, L), a 1x1 Conv1d over
    it: a sequence of positions that is no one grid (a single flattened grid is shown as its map)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(12, 12, 3, stride=2, padding=1)
        self.head = nn.Conv1d(12, 7, 1)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        h3 = torch.relu(self.c3(h))
        return torch.sigmoid(self.head(torch.cat([h.flatten(2), h3.flatten(2)], 2)))


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    d = tmp_path_factory.mktemp("grey")
    m = GreyNet()
    return m, export(m, d / "grey.onnx", (1, 1, 32, 96))


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    d = tmp_path_factory.mktemp("head")
    m = HeadNet()
    return m, export(m, d / "head.onnx", (1, 3, 64, 64))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("imgs")
    for name in ("chelsea", "coffee", "rocket"):
        Image.fromarray(photos[name]).save(d / f"{name}.png")
    return d


def luma(rgb):
    return np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64)


def test_grey_onnx_model_sees_the_pictures_luma(grey, photos):
    m, path = grey
    b = dv.load_backend("onnx", path=path, mean=[127.5], std=[127.5])
    assert (b.channels, b.channel_order, b.input_size) == (1, "grey", (32, 96))
    view = b.view(photos["astronaut"])
    assert view.shape == (32, 96, 3) and (view[..., 0] == view[..., 1]).all() and (view[..., 1] == view[..., 2]).all()
    x = b.preprocess(photos["astronaut"])
    assert x.shape == (1, 1, 32, 96)
    # what the net reads is the luma of the view, scaled as asked: checked against the module itself
    rgb = np.asarray(Image.fromarray(photos["astronaut"]).resize((96, 96), Image.BILINEAR))[32:64]
    want_in = (luma(rgb) - 127.5) / 127.5
    with torch.no_grad():
        want = m(torch.tensor(want_in, dtype=torch.float32)[None, None])
        got = b.forward(x, ["fc/Gemm"])["fc/Gemm"]
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    with pytest.raises(DeepvisError, match=r"mean must be 1 number \(grey, 0..255\) for this 1-channel model"):
        dv.load_backend("onnx", path=path, mean=[1, 2, 3])


@pytest.mark.parametrize("preset", ["paper_3", "lucid", "maco"])
def test_grey_model_is_optimized_into_grey_images(grey, preset):
    _, path = grey
    b = dv.load_backend("onnx", path=path, labels=None)
    r = optimize(b, ["fc/Gemm:2", "c2/Conv:5"], preset=preset, steps=30, progress=False)
    img = r.images
    assert img.shape == (2, 32, 96, 3) and (img[..., 0] == img[..., 2]).all()
    assert r.x.shape[1] == 1 and np.isfinite(r.best_activation).all()
    if preset == "paper_3":  # (the successors' random transforms barely move this random 5-class net)
        start = optimize(b, ["fc/Gemm:2", "c2/Conv:5"], preset=preset, steps=1, progress=False).best_activation
        assert (r.best_activation > start).all(), (r.best_activation, start)
    if preset == "maco":  # MACO's fixed magnitude is the spectrum of the photos' luma
        spectrum = np.abs(np.fft.rfft2(r.x[0, 0].numpy() - r.x[0, 0].numpy().mean()))
        assert spectrum[1:4, 1:4].mean() > 5 * spectrum[12:16, 40:48].mean()  # natural: 1/f, not flat


def test_grey_onnx_model_in_every_tool(grey, image_folder, tmp_path):
    _, path = grey
    r = run("deepvis-inspect", "backend=onnx", f"backend.path={path}", f"image={image_folder / 'rocket.png'}")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 5  # the top 5 of 5 classes, named by index (no labels)
    r = run("deepvis-inspect", "backend=onnx", f"backend.path={path}")
    assert "input 32x96, grey (1 channel: pictures are fed as their luma)" in r.stdout, r.stdout
    out = tmp_path / "opt"
    r = run("deepvis-optimize", "backend=onnx", f"backend.path={path}", "unit=fc/Gemm:1", "optimize.steps=5",
            f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    png = np.asarray(Image.open(out / "fc-Gemm_1.png" if (out / "fc-Gemm_1.png").exists()
                                else next(out.glob("*_1.png"))).convert("RGB"))
    assert png.shape[:2] == (32, 96) and (png[..., 0] == png[..., 1]).all()
    r = run("deepvis-live", "backend=onnx", f"backend.path={path}", "source=images", f"source.path={image_folder}",
            "live.max_frames=8", f"live.stats={tmp_path / 's.json'}", "live.keys=[b,b,b]")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["net_passes"] >= 1 and s["error"] is None
    atlas = tmp_path / "atlas"
    r = run("deepvis-mine", "backend=onnx", f"backend.path={path}", f"corpus.path={image_folder}",
            "layers=[c2/Conv]", "top_k=2", "engine.workers=0", f"atlas.dir={atlas}")
    assert r.returncode == 0, r.stderr
    tiles = sorted(atlas.rglob("*.jpg"))
    assert tiles, list(atlas.rglob("*"))
    for t in tiles[:6]:  # the top images and their backprops are grey: the net's view
        a = np.asarray(Image.open(t).convert("RGB")).astype(int)
        assert np.abs(a[..., 0] - a[..., 2]).max() <= 8, t  # JPEG's chroma rounding only


def test_grey_caffe_model_matches_caffe_and_converts(tmp_path):
    layers, size, blobs, proto, weights = model_files(caffenet_shaped, 6, tmp_path, channels=1)
    b = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), mean=[100], cache_dir="")
    assert (b.channels, b.channel_order) == (1, "grey")
    grey_in = np.random.default_rng(1).uniform(0, 255, (2, 1, size, size))
    want = reference_blobs(layers, blobs, grey_in - 100)
    with torch.no_grad():
        got = b.forward(torch.tensor(grey_in - 100, dtype=torch.float32), b.layers)
    for name in b.layers:
        w = want[name]
        assert np.abs(got[name].double().numpy() - w).max() / max(np.abs(w).max(), 1e-6) < 2e-5, name
    with pytest.raises(DeepvisError, match="mean must be one value for this 1-channel"):
        dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), mean=[104, 117, 123], cache_dir="")
    onnx_path = tmp_path / "grey.onnx"
    r = run("deepvis-convert", "backend=caffe", f"backend.prototxt={proto}", f"backend.weights={weights}",
            "backend.mean=[100]", f"output={onnx_path}")
    assert r.returncode == 0, r.stderr
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (ort_out,) = sess.run(None, {sess.get_inputs()[0].name: grey_in.astype(np.float32) - 100})
    assert np.abs(ort_out - want["prob"]).max() < 1e-5
    via = dv.load_backend("onnx", path=str(onnx_path))  # the file's metadata: grey, mean 100
    assert via.channels == 1
    pic = np.random.default_rng(2).integers(0, 255, (size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        a = b.forward(b.preprocess(pic), ["prob"])["prob"]
        c = via.forward(via.preprocess(pic), ["prob"])["prob"]
    assert torch.allclose(a, c, atol=1e-5)


def test_a_model_of_four_channels_lists_its_layers_and_refuses_images_in_one_line(tmp_path, photos):
    path = export(GreyNet(channels=4), tmp_path / "rgbd.onnx", (1, 4, 32, 32))
    b = dv.load_backend("onnx", path=path)
    assert b.channels == 4
    assert layer_shapes(b, ["c2/Conv"])["c2/Conv"] == (16, 16, 16)
    with pytest.raises(DeepvisError, match="reads 4-channel inputs: images can be fed only to 3-channel"):
        b.preprocess(photos["rocket"])
    r = run("deepvis-inspect", "backend=onnx", f"backend.path={path}")
    assert r.returncode == 0 and "c2/Conv" in r.stdout, r.stderr
    r = run("deepvis-optimize", "backend=onnx", f"backend.path={path}", "unit=c2/Conv:1", "optimize.steps=5",
            f"hydra.run.dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "reads 4-channel inputs" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_detector_head_of_one_spatial_axis_in_every_tool(head, image_folder, tmp_path, photos):
    m, path = head
    b = dv.load_backend("onnx", path=path)
    shapes = layer_shapes(b, b.layers)
    assert shapes["head/Conv"] == (7, 1, 320)  # (N, C, L) of two grids: a one-row map
    assert b.layer_layout("head/Conv").kind == "sequence"
    with torch.no_grad():
        want = m(b.preprocess(photos["rocket"]) / torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1))
        got = b.forward(b.preprocess(photos["rocket"]), [b.layers[-1]])[b.layers[-1]]
    assert torch.allclose(got[:, :, 0], want, atol=1e-5)
    # the lr calibration takes the (N, C, 1, L) output layer; a unit along L is optimized
    r = optimize(b, ["head/Conv:3:0:100", "head/Conv:4"], preset="paper_3", steps=20, progress=False)
    start = optimize(b, ["head/Conv:3:0:100", "head/Conv:4"], preset="paper_3", steps=1, progress=False)
    assert (r.best_activation > start.best_activation).all()
    r = run("deepvis-live", "backend=onnx", f"backend.path={path}", "source=images", f"source.path={image_folder}",
            "live.max_frames=8", f"live.stats={tmp_path / 's.json'}", "live.layer=head/Conv", "live.keys=[b,b]")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["error"] is None
    assert "Warning" not in r.stderr, r.stderr  # onnx2torch's Slice warning is not printed on every pass
    atlas = tmp_path / "atlas"
    r = run("deepvis-mine", "backend=onnx", f"backend.path={path}", f"corpus.path={image_folder}",
            "layers=[head/Conv]", "top_k=2", "engine.workers=0", f"atlas.dir={atlas}")
    assert r.returncode == 0, r.stderr
    assert len(list(atlas.rglob("*.jpg"))) >= 7


def test_an_onnx_detector_with_an_unconvertible_head_is_viewed_up_to_its_backbone(head, tmp_path, photos):
    """The head's Conv1d output goes through an operator onnx2torch does not have (as a detector's
    NonMaxSuppression would): refused in one line that suggests until=; with until= the graph is cut
    before conversion and the backbone works in every tool."""
    import onnx
    from onnx import TensorProto, helper

    m, path = head
    model = onnx.load(path)
    last = model.graph.output[0].name
    model.graph.node.append(helper.make_node("MadeUpNMS", [last], ["boxes"], name="nms", domain=""))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("boxes", TensorProto.FLOAT, None))
    det = tmp_path / "det.onnx"
    onnx.save(model, str(det))
    producer = next(n.name for n in model.graph.node if last in n.output).lstrip("/")
    with pytest.raises(DeepvisError, match=r"uses operator MadeUpNMS \(opset 17\) at node 'nms', which onnx2torch "
                                           r"cannot convert; to look at the network before it, give backend.until="):
        dv.load_backend("onnx", path=str(det))
    b = dv.load_backend("onnx", path=str(det), until="c2/Conv")
    assert b.layers[-1] == "c2/Conv" and "head/Conv" not in b.layers
    full = dv.load_backend("onnx", path=path)
    x = full.preprocess(photos["coffee"])
    with torch.no_grad():
        assert torch.equal(b.forward(x, ["c2/Conv"])["c2/Conv"], full.forward(x, ["c2/Conv"])["c2/Conv"])
    r = optimize(b, ["c2/Conv:3"], preset="paper_3", steps=5, progress=False)
    assert r.stopped == {}
    with pytest.raises(DeepvisError, match="until=c9/Conv: ONNX file .* has no node or value of that name"):
        dv.load_backend("onnx", path=str(det), until="c9/Conv")
    r = run("deepvis-inspect", "backend=onnx", f"backend.path={det}")
    assert r.returncode == 2 and "backend.until=" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    suggested = r.stderr.strip().rsplit("backend.until=", 1)[1]
    r = run("deepvis-inspect", "backend=onnx", f"backend.path={det}", f"backend.until={suggested}")
    assert r.returncode == 0 and suggested in r.stdout, r.stderr


class GreyNHWC(nn.Module):
    """A Keras-style grey OCR input: (N, H, W, 1), transposed inside."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.c1(x.permute(0, 3, 1, 2))).mean((2, 3))


def test_a_keras_style_grey_input_is_fed_as_it_expects(tmp_path, photos):
    m = GreyNHWC()
    path = export(m, tmp_path / "nhwc_grey.onnx", (1, 48, 160, 1))
    b = dv.load_backend("onnx", path=path, mean=[0], std=[255])
    assert (b.channels, b.layout, b.input_size) == (1, "NHWC", (48, 160))
    x = b.preprocess(photos["chelsea"])
    with torch.no_grad():
        want = m((x + b.mean).permute(0, 2, 3, 1) / 255)
        got = b.forward(x, [b.layers[-1]])[b.layers[-1]]
    assert torch.allclose(got.flatten(1), want, atol=1e-5)
