"""Model files as people have them (issue: real model files from others): NHWC exports, graphs
that end in their own Softmax, graphs full of shape arithmetic, a dynamo (opset 18+) export, small
heads, models that output NaN or fail, and the one-line errors and warnings users get."""
import json
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

import deepvis_repro as dv
from deepvis_repro.errors import DeepvisError

HERE = Path(__file__).resolve().parent
PLUGINS = HERE / "plugins"
ENV = dict(os.environ, SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy",
           PYTHONPATH=os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]))


def run(cmd, *args, timeout=300):
    return subprocess.run([cmd, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def one_line_error(r, text):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-1500:])
    assert text in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def export(model, path, shape, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(*shape),), str(path), input_names=["input"],
                          output_names=["output"], **{"dynamo": False, "opset_version": 17, **kw})
    return path


class NHWCNet(nn.Module):
    """A TF-style model: NHWC input, transposed to NCHW for the convolutions, transposed back
    for an elementwise layer, pooled, a 4-class head that ends in its own Softmax."""

    def __init__(self, classes=4):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):                       # x: (N, H, W, 3)
        h = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
        h = h.permute(0, 2, 3, 1) * 2.0         # an NHWC activation inside the graph
        logits = self.fc(h.mean((1, 2)))
        return torch.softmax(logits, 1)


@pytest.fixture(scope="module")
def nhwc(tmp_path_factory):
    m = NHWCNet()
    return m, export(m, tmp_path_factory.mktemp("nhwc") / "nhwc.onnx", (1, 48, 48, 3))


def test_nhwc_model_is_fed_and_shown_as_it_expects(nhwc, photos):
    model, path = nhwc
    b = dv.load_backend("onnx", path=str(path), mean=[127.5] * 3, std=[127.5] * 3)
    assert b.layout == "NHWC" and b.input_size == (48, 48)  # not (48, 3)
    x = torch.cat([b.preprocess(photos["chelsea"]), b.preprocess(photos["coffee"])])
    nhwc_in = (x / 127.5).permute(0, 2, 3, 1)  # (pixel - mean) / std
    with torch.no_grad():
        want = model(nhwc_in)
        got = b.forward(x, b.layers)
    assert torch.allclose(got["prob"], want, atol=1e-6)  # the model's own probabilities
    assert torch.allclose(got["prob"].sum(1), torch.ones(2), atol=1e-5)
    maps = [l for l in b.layers if got[l].dim() == 4]
    assert maps and all(got[l].shape[1] == 6 and got[l].shape[2:] == (24, 24) for l in maps), \
        {l: tuple(got[l].shape) for l in maps}  # NCHW for the user, the NHWC one included
    with torch.no_grad():
        relu = torch.relu(model.conv(nhwc_in.permute(0, 3, 1, 2)))
    assert any(torch.allclose(got[l], relu * 2.0, atol=1e-5) for l in maps)
    with pytest.raises(DeepvisError, match="layout must be NCHW, NHWC or auto"):
        dv.load_backend("onnx", path=str(path), layout="HWC")


def test_a_final_softmax_is_prob_not_softmaxed_twice(nhwc, photos, tmp_path):
    model, path = nhwc
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\ncup\nsky\n")
    b = dv.load_backend("onnx", path=str(path), labels=str(labels), mean=[127.5] * 3, std=[127.5] * 3)
    assert b.layers[-1] == "prob" and b.layers.count("prob") == 1
    x = b.preprocess(photos["coffee"])
    with torch.no_grad():
        p = b.forward(x, ["prob"])["prob"][0]
        want = model((x / 127.5).permute(0, 2, 3, 1))[0]
    assert torch.allclose(p, want, atol=1e-6) and float(p.max()) > float(torch.softmax(want, 0).max())


class ShapeArithmeticNet(nn.Module):
    """x.view(x.size(0), -1), zeros shaped like the batch, casts: Shape, Gather, Unsqueeze,
    Concat, Reshape, ConstantOfShape and Cast nodes in the graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        flat = h.view(h.size(0), -1)
        bias = torch.zeros(h.shape[0], 2, dtype=torch.float64).to(flat.dtype)
        return self.fc(flat) + bias


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    path = export(ShapeArithmeticNet(), d / "shapes.onnx", (1, 3, 32, 32), dynamic_axes={"input": {0: "n"}})
    (d / "two.txt").write_text("left\nright\n")
    return path, d / "two.txt"


def test_a_labels_file_shorter_than_the_classes_is_one_line(shapes_model, tmp_path):
    """Issue 21: one name for a two-class net was an IndexError deep in a run."""
    path, _ = shapes_model
    (tmp_path / "one.txt").write_text("left\n")
    r = run("deepvis-inspect", "backend=onnx", f"backend.path={path}", f"backend.labels={tmp_path / 'one.txt'}")
    one_line_error(r, "names 1 classes, but the model's output layer")


def test_a_tiny_onnx_file_claiming_a_huge_input_is_refused_before_allocating(tmp_path):
    """Issue 21: a 556-byte file declaring a 10000x10000 input drove inspect to 18 GB."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 10000, 10000])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 10000, 10000])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["out"], name="relu")], "huge", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "huge.onnx")
    assert (tmp_path / "huge.onnx").stat().st_size < 1000
    r = run("deepvis-inspect", "backend=onnx", f"backend.path={tmp_path / 'huge.onnx'}", timeout=60)
    one_line_error(r, "input size 10000x10000")


def test_a_tiny_onnx_file_claiming_a_huge_weight_is_one_line(tmp_path):
    """Issue 21: refused before allocating, but as a ValueError traceback."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    w = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 3, 30000, 30000], raw_data=b"\0" * 16)
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["out"], name="conv")], "g", [x], [y],
                              initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "w.onnx")
    r = run("deepvis-inspect", "backend=onnx", f"backend.path={tmp_path / 'w.onnx'}", timeout=60)
    one_line_error(r, "weight 'w' claims shape [4, 3, 30000, 30000]")


def test_shape_arithmetic_is_not_a_layer(shapes_model, photos, tmp_path):
    path, labels = shapes_model
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Shape", "Gather", "Concat", "Reshape"} <= ops | {"Gather"} and "Shape" in ops
    b = dv.load_backend("onnx", path=str(path), labels=str(labels))
    from deepvis_repro.units import layer_shapes
    shapes = layer_shapes(b, b.layers)
    assert all(len(s) >= 1 and s[0] >= 1 for s in shapes.values()), shapes
    assert not any(s == () for s in shapes.values())
    r = run("deepvis-inspect", "backend=onnx", f"backend.path={path}", f"backend.labels={labels}")
    assert r.returncode == 0, r.stderr
    assert "prob" in r.stdout


def test_two_class_model_in_every_tool(shapes_model, photos, tmp_path):
    path, labels = shapes_model
    Image.fromarray(photos["rocket"]).save(tmp_path / "rocket.png")
    r = run("deepvis-inspect", "backend=onnx", f"backend.path={path}", f"backend.labels={labels}",
            f"image={tmp_path / 'rocket.png'}")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 2  # top_k 5 asked, 2 classes shown
    out = tmp_path / "opt"
    r = run("deepvis-optimize", "backend=onnx", f"backend.path={path}", f"backend.labels={labels}", "unit=prob:1",
            "optimize.steps=5", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "results.json").read_text())
    assert len(rec["results"][0]["image_top5"]) == 2 and (out / "prob_1.png").is_file()
    (tmp_path / "imgs").mkdir()
    Image.fromarray(photos["rocket"]).save(tmp_path / "imgs" / "rocket.png")
    r = run("deepvis-live", "backend=onnx", f"backend.path={path}", f"backend.labels={labels}", "source=images",
            f"source.path={tmp_path / 'imgs'}", "live.max_frames=10", f"live.stats={tmp_path / 's.json'}")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["net_passes"] >= 1 and s["error"] is None


def test_dynamo_export_at_opset_18_loads(tmp_path, photos):
    pytest.importorskip("onnxscript")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.fc = nn.Linear(5, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))  # ReduceMean

    m = Net().eval()
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.zeros(1, 3, 40, 40),), str(path), dynamo=True)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert "ReduceMean" in {n.op_type for n in model.graph.node}
    b = dv.load_backend("onnx", path=str(path), mean=[0, 0, 0], std=[255, 255, 255])
    x = b.preprocess(photos["chelsea"])
    with torch.no_grad():
        assert torch.allclose(b.forward(x, [b.layers[-1]])[b.layers[-1]], m((x + b.mean) / 255), atol=1e-5)


def test_external_data_outside_the_models_folder_is_refused(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    (tmp_path / "model").mkdir()
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(m, str(tmp_path / "model" / "m.onnx"), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    evil = onnx.load(str(tmp_path / "model" / "m.onnx"), load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes((tmp_path / "model" / "w.bin").read_bytes())
    onnx.save(evil, str(tmp_path / "model" / "evil.onnx"))
    r = run("deepvis-inspect", "backend=onnx", f"backend.path={tmp_path / 'model' / 'evil.onnx'}")
    one_line_error(r, "its external data is refused")
    assert "points outside the directory" in r.stderr


@pytest.mark.parametrize("cmd, args, text", [
    ("deepvis-inspect", ["backend=caffenet"], "missing backend.weights: give backend.weights=PATH"),
    ("deepvis-inspect", ["backend=caffe"], "missing backend.prototxt"),
    ("deepvis-inspect", ["backend=onnx"], "missing backend.path: give backend.path=PATH"),
    ("deepvis-live", ["source=video", "source.path=PHOTO"], "cannot decode video"),
    ("deepvis-optimize", ["step=50"], "unknown config key 'step' for deepvis-optimize"),
    # issue 21: a typo names the nearest valid keys; Hydra's '+' hint would have ignored the value
    ("deepvis-optimize", ["optimize.step=50"], "unknown config key 'optimize.step' for deepvis-optimize; did you "
                                              "mean optimize.steps"),
    ("deepvis-optimize", ["+optimize.step=50"], "unknown config key 'optimize.step'"),
    ("deepvis-optimize", ["+optimize.steps=5"], "'+optimize.steps' adds a key, but optimize.steps exists"),
    ("deepvis-inspect", ["imgae=x.jpg"], "unknown config key 'imgae' for deepvis-inspect; did you mean image?"),
    ("deepvis-mine", ["atlas.dir=PHOTO"], "is a file, not a folder"),
    ("deepvis-live", ["source=image", "source.path=PHOTO", "live.atlas=PHOTO"], "is a file, not an atlas folder"),
    ("deepvis-live", ["source=image", "source.path=PHOTO", "live.atlas=MISSING"], "atlas folder not found"),
    ("deepvis-live", ["source=image", "source.path=PHOTO", "live.keys=[y,F5,zz,o]"],
     "unknown key(s) in live.keys: y, F5, zz; valid:"),
    ("deepvis-optimize", ["optimize.numerics=exact"], "numerics must be one of default, portable, bf16, got 'exact'"),
    ("deepvis-optimize", ["optimize.steps=abc"], "optimize.steps must be a whole number, got 'abc'"),
    ("deepvis-optimize", ["optimize.steps=2.5"], "optimize.steps must be a whole number, got 2.5"),
    ("deepvis-optimize", ["optimize.seed=abc"], "optimize.seed must be a whole number"),
    ("deepvis-optimize", ["optimize.batch_size=-3"], "optimize.batch_size must be at least 1, got -3"),
    ("deepvis-optimize", ["optimize.lr_scale=-1"], "optimize.lr_scale must be greater than 0"),
    ("deepvis-optimize", ["optimize.lr_scale=0"], "optimize.lr_scale must be greater than 0"),
    ("deepvis-optimize", ["optimize.lr_scale=nan"], "optimize.lr_scale must be a finite number"),
    ("deepvis-optimize", ["optimize.lr_scale=inf"], "optimize.lr_scale must be a finite number"),
    ("deepvis-optimize", ["units=[]"], "units=[] names no units"),
    ("deepvis-optimize", ["device=cpux"], "unknown device 'cpux'"),
    ("deepvis-mine", ["top_k=abc"], "top_k must be a whole number"),
    ("deepvis-reproduce", ["ssim_threshold=abc"], "ssim_threshold must be a number"),
    ("deepvis-reproduce", ["seed=abc"], "seed must be a whole number"),
    ("deepvis-reproduce", ["profile.settings=[paper_3,paper_9]"], "unknown preset 'paper_9'"),
])
def test_user_errors_are_one_line_with_status_2(cmd, args, text, tmp_path, photos):
    if any("PHOTO" in a for a in args):
        Image.fromarray(photos["coffee"]).save(tmp_path / "photo.jpg")
        args = [a.replace("PHOTO", str(tmp_path / "photo.jpg")) for a in args]
    args = [a.replace("MISSING", str(tmp_path / "no_such_atlas")) for a in args]
    r = run(cmd, *args, f"hydra.run.dir={tmp_path / 'run'}")
    one_line_error(r, text)
    assert not (tmp_path / "run").exists() or cmd == "deepvis-live"  # no empty run folder left


def test_a_corpus_of_only_unreadable_images_is_an_error(tmp_path):
    """Issue 21: it used to say 'mined 2 images', every entry -1."""
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"not a jpeg")
    (d / "b.png").write_bytes(b"")
    r = run("deepvis-mine", f"corpus.path={d}", "layers=[fc]", "montages=false", f"atlas.dir={tmp_path / 'A'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    last = r.stderr.strip().splitlines()[-1]  # after the progress lines, one error line
    assert last.startswith("deepvis-mine: error: no readable image in the corpus: all 2 were skipped")
    assert (tmp_path / "A" / "skipped.tsv").is_file() and not (tmp_path / "A" / "layers").exists()


def test_a_file_name_that_is_not_utf8(tmp_path, photos):
    """Issue 21: non-UTF-8 file names were a traceback writing corpus.txt."""
    d = tmp_path / "c"
    d.mkdir()
    raw = os.path.join(os.fsencode(d), b"caf\xe9.png")
    Image.fromarray(photos["coffee"]).save(os.fsdecode(raw))
    (d / "broken.jpg").write_bytes(b"x")
    r = run("deepvis-mine", f"corpus.path={d}", "layers=[fc]", "montages=false", "top_k=1",
            f"atlas.dir={tmp_path / 'A'}")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-1500:]
    from deepvis_repro.atlas.mining import load_result
    back = load_result(tmp_path / "A")
    assert os.fsencode(back.paths[1]) == raw  # the bytes on disk, round-tripped
    assert int(back.image_ids["fc"][0, 0]) == 1


def test_fifos_as_a_corpus_list_or_in_a_folder(tmp_path, photos):
    """Issue 21: a FIFO as the list hung forever; FIFOs in a folder were dropped unsaid."""
    os.mkfifo(tmp_path / "l.txt")
    r = run("deepvis-mine", f"corpus.path={tmp_path / 'l.txt'}", "layers=[fc]", "montages=false",
            f"atlas.dir={tmp_path / 'A'}", timeout=120)
    one_line_error(r, "is not a regular file or a folder (a FIFO or a device?)")
    from deepvis_repro.atlas.corpus import open_corpus
    from deepvis_repro.atlas.mining import mine

    d = tmp_path / "c"
    d.mkdir()
    Image.fromarray(photos["coffee"]).save(d / "a.png")
    os.mkfifo(d / "b.jpg")
    assert [os.path.basename(p) for p in open_corpus(str(d)).items] == ["a.png", "b.jpg"]
    import deepvis_repro as dv
    res = mine(dv.load_backend(), str(d), ["fc"], top_k=1, progress=False)
    assert [os.path.basename(p) for _, p, _ in res.skipped] == ["b.jpg"]


def test_backend_given_as_a_yaml_path(tmp_path, photos):
    Image.fromarray(photos["coffee"]).save(tmp_path / "c.png")
    r = run("deepvis-inspect", f"backend={PLUGINS / 'tiny_none.yaml'}", f"image={tmp_path / 'c.png'}")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 3 and "class" in r.stdout


def test_a_model_that_outputs_nan(tmp_path, photos):
    Image.fromarray(photos["coffee"]).save(tmp_path / "c.png")
    r = run("deepvis-inspect", f"backend={PLUGINS / 'tiny_nan.yaml'}", f"image={tmp_path / 'c.png'}")
    one_line_error(r, "NaN")
    out = tmp_path / "opt"
    r = run("deepvis-optimize", f"backend={PLUGINS / 'tiny_nan.yaml'}", "unit=fc:1", "optimize.steps=3",
            f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    assert "stopped at step 0: NaN" in r.stderr
    text = (out / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert (out / "fc_1.png").is_file()
    (tmp_path / "imgs").mkdir()
    Image.fromarray(photos["coffee"]).save(tmp_path / "imgs" / "c.png")
    r = run("deepvis-live", f"backend={PLUGINS / 'tiny_nan.yaml'}", "source=images", f"source.path={tmp_path / 'imgs'}",
            "live.max_frames=10", "live.keys=[o]", f"live.stats={tmp_path / 's.json'}")
    assert r.returncode == 0, r.stderr  # the view runs and says what is wrong
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["net_passes"] >= 1


def test_a_network_that_keeps_failing_ends_the_view_visibly(tmp_path, photos):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(photos["coffee"]).save(tmp_path / "imgs" / "c.png")
    shot = tmp_path / "shot.png"
    r = run("deepvis-live", f"backend={PLUGINS / 'tiny_fail.yaml'}", "source=images", f"source.path={tmp_path / 'imgs'}",
            f"live.screenshot={shot}", f"live.stats={tmp_path / 's.json'}")
    assert r.returncode == 2, r.stderr
    assert "the network keeps failing" in r.stderr and "simulated failure" in r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert "simulated failure" in s["error"] and s["net_passes"] == 0
    img = np.asarray(Image.open(shot)).astype(int)
    assert (img[..., 0] > 200).sum() > 50 and (img[..., 0] - img[..., 2] > 80).sum() > 50  # red error text


def test_random_torchvision_weights_are_said(photos, tmp_path):
    Image.fromarray(photos["coffee"]).save(tmp_path / "c.png")
    r = run("deepvis-inspect", "backend=torchvision", "backend.arch=resnet18", f"image={tmp_path / 'c.png'}")
    assert r.returncode == 0
    assert r.stderr.count("random weights") == 1 and "backend.weights" in r.stderr


def test_tiff_images_of_any_depth(tmp_path):
    from deepvis_repro.images import load_image

    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(ramp, mode="F").save(tmp_path / "float.tif")
    a = load_image(tmp_path / "float.tif")
    assert a[0, 0, 0] == 0 and a[-1, -1, 0] == 255 and abs(int(a[32, 0, 0]) - 128) <= 2  # 0..1 scaled
    big = (np.arange(64 * 64, dtype=np.int32).reshape(64, 64) * 20)  # up to 81900: past 65535
    Image.fromarray(big, mode="I").save(tmp_path / "int32.tif")
    b = load_image(tmp_path / "int32.tif").astype(int)[..., 0]
    assert np.all(np.diff(b.reshape(-1)) >= 0) and b.max() == 255  # monotone: never wrapped


def test_caffe_era_resize_then_crop(photos):
    from deepvis_repro.images import resize_for_input

    img = photos["coffee"]  # 400x600
    want = np.asarray(Image.fromarray(img).resize((256, 256), Image.BILINEAR))[14:241, 14:241]
    np.testing.assert_array_equal(resize_for_input(img, (227, 227), resize=(256, 256)), want)
    b = dv.load_backend(resize=[256, 256])
    assert b.view(img).shape == (224, 224, 3)
    np.testing.assert_array_equal(b.view(img), np.asarray(Image.fromarray(img).resize((256, 256), Image.BILINEAR))[16:240, 16:240])
    with pytest.raises(DeepvisError, match="no smaller than the input"):
        dv.load_backend(resize=[200, 200])


def test_the_lucent_benchmark_names_what_is_missing():
    code = ("import runpy, sys; sys.modules['lucent'] = None; sys.argv = ['bench_optimize.py', '--steps', '2'];"
            f"runpy.run_path({str(HERE.parent / 'benchmarks' / 'bench_optimize.py')!r}, run_name='__main__')")
    r = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "nan" not in r.stdout
    assert "Lucent cannot be imported" in r.stderr and "pip install torch-lucent kornia kornia-rs decorator --no-deps" in r.stderr


def test_redirected_logs_hold_no_escape_codes(tmp_path):
    r = run("deepvis-optimize", "units=[fc:1,fc:2]", "optimize.steps=3", f"hydra.run.dir={tmp_path / 'o'}")
    assert r.returncode == 0 and r.stderr.strip()
    assert "\x1b[" not in r.stderr and "\r" not in r.stderr  # plain lines, not a bar's redraws


def test_live_layout_keeps_the_caption_and_the_selected_layer_in_view():
    import pygame

    from deepvis_repro.live.draw import CAPTION_H, STATUS_H, Painter, layer_window

    for n in range(1, 40):
        for rows in range(1, 16):
            for cur in range(n):
                start = layer_window(n, cur, rows)
                assert start <= cur < start + rows and start + min(rows, n) <= n
    pygame.display.init()
    pygame.font.init()
    try:
        screen = pygame.display.set_mode((1280, 720))
        for pane in (False, True):
            p = Painter(screen, ["conv1", "conv2"], with_pane=pane)
            assert p.grid_box.bottom + 4 + CAPTION_H <= 720 - STATUS_H  # the caption above the status bar
            if pane:
                assert p.grid_box.right < p.pane_box.x and p.pane_box.bottom <= 720 - STATUS_H
    finally:
        pygame.quit()
