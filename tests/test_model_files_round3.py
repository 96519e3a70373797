"""Real model files, round three (issue 35), each property in a model built here: a graph written
out of order in float16 (onnxruntime's fp16 converter), Keras-style auto_pad on a dynamic input,
a second input, a (T, N, C) output, and a node onnx2torch cannot convert deep in a graph."""
import os
import subprocess
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from torch import nn

import deepvis_repro as dv
from deepvis_repro.errors import DeepvisError


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(h.mean((2, 3)))


def export(model, path, shape=(1, 3, 32, 32), **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(*shape),), str(path), input_names=["input"],
                          output_names=["output"], dynamo=False, opset_version=17,
                          dynamic_axes={"input": {0: "n"}}, **kw)
    return path


def to_fp16_out_of_order(src, dst):
    """What onnxruntime's fp16 converter writes (keep_io_types): float16 weights, a Cast of the
    float input to float16 and of the output back; its input Cast sits after the nodes that use it."""
    m = onnx.load(str(src))
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    nodes = list(g.node)
    for n in nodes:
        n.input[:] = ["graph_input_cast0" if v == "input" else v for v in n.input]
        n.output[:] = ["out16" if v == "output" else v for v in n.output]
    cast_in = helper.make_node("Cast", ["input"], ["graph_input_cast0"], to=TensorProto.FLOAT16, name="graph_input_cast_0")
    cast_out = helper.make_node("Cast", ["out16"], ["output"], to=TensorProto.FLOAT, name="graph_output_cast_0")
    del g.node[:]
    g.node.extend(nodes + [cast_out, cast_in])  # out of order, as the converter leaves them
    onnx.save(m, str(dst))
    return dst


def test_an_fp16_graph_written_out_of_order_runs_in_float32(tmp_path, photos):
    """Issue 35 item 4: KeyError('graph_input_cast0'), exit 1; fp16 files quoted torch's dtype error."""
    model = Small()
    f16 = to_fp16_out_of_order(export(model, tmp_path / "f32.onnx"), tmp_path / "f16.onnx")
    b = dv.load_backend("onnx", path=str(f16), mean=[127.5] * 3, std=[127.5] * 3)
    x = b.preprocess(photos["chelsea"])
    with torch.no_grad():
        got = b.forward(x, [b.layers[-1]])[b.layers[-1]]
        rounded = Small()  # the file's arithmetic in float32: its float16 weights, exactly
        rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        want = rounded(x / 127.5)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(f16), providers=["CPUExecutionProvider"])
    theirs = sess.run(None, {"input": (x / 127.5).numpy()})[0]  # float16 arithmetic: close, not equal
    assert np.abs(theirs - got.numpy()).max() < 2e-2 * np.abs(theirs).max()


def test_keras_style_auto_pad_on_a_dynamic_input(tmp_path, photos):
    """Issue 35 item 3: VALID on a dynamic input was refused even with backend.input_size; VALID
    needs no size, and SAME takes the size the model will be fed."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
    for mode, needs_size in (("VALID", False), ("SAME_UPPER", True)):
        g = helper.make_graph(
            [helper.make_node("Conv", ["x", "w1"], ["a"], auto_pad=mode, strides=[2, 2], name="conv1"),
             helper.make_node("Relu", ["a"], ["b"], name="relu1"),
             helper.make_node("Conv", ["b", "w2"], ["y"], auto_pad=mode, name="conv2")],
            "keras", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
        path = tmp_path / f"{mode}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
        if needs_size:  # without a size SAME cannot be made explicit: said, with what to give
            with pytest.raises(DeepvisError, match="no fixed input size; give backend.input_size"):
                dv.load_backend("onnx", path=str(path), mean=[0] * 3, std=[1] * 3)
        b = dv.load_backend("onnx", path=str(path), mean=[0] * 3, std=[1] * 3, input_size=[33, 47])
        x = b.preprocess(photos["coffee"])
        ort = pytest.importorskip("onnxruntime")
        theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            ours = b.forward(x, ["conv2"])["conv2"].numpy()
        assert ours.shape == theirs.shape and np.allclose(ours, theirs, atol=1e-3, rtol=1e-4), mode


def test_a_second_input_is_named_or_fed_a_constant(tmp_path):
    """Issue 35 item 5: "forward() missing 1 required positional argument: 'input_2'"."""
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, image, mask):
            return self.conv(image) * mask

    path = tmp_path / "two.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TwoInputs().eval(), (torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, 14, 14)), str(path),
                          input_names=["image", "mask"], dynamo=False, opset_version=17)
    with pytest.raises(DeepvisError, match=r"has 2 inputs \('image' \[1, 3, 16, 16\], 'mask' \[1, 1, 14, 14\]\); "
                                           r"deepvis feeds a model one image: give the others a constant value, "
                                           r"e.g. backend.constant_inputs=\{mask: 1.0\}"):
        dv.load_backend("onnx", path=str(path))
    with pytest.raises(DeepvisError, match="names masks, which the model's other inputs are not"):
        dv.load_backend("onnx", path=str(path), constant_inputs={"masks": 1})
    # the mask as a constant: the model runs on images alone, as its own forward with that mask
    model = TwoInputs().eval()
    path = tmp_path / "two_dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, 14, 14)), str(path),
                          input_names=["image", "mask"], dynamo=False, opset_version=17,
                          dynamic_axes={"image": {0: "n"}, "mask": {0: "n"}})
    b = dv.load_backend("onnx", path=str(path), mean=[0] * 3, std=[1] * 3, constant_inputs={"mask": 0.5})
    x = torch.rand(3, 3, 16, 16) * 255 - 128
    last = b.layers[-1]
    with torch.no_grad():
        assert torch.allclose(b.forward(x, [last])[last], model(x, torch.full((3, 1, 14, 14), 0.5)), atol=1e-5)


def test_a_batch_second_output_is_said_not_dropped(tmp_path):
    """Issue 35 item 7: a CRNN's (T, N, C) logits were silently not a layer."""
    class Crnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)

        def forward(self, x):
            h = torch.relu(self.conv(x)).mean(2)  # (N, C, W)
            return h.permute(2, 0, 1) * 2.0        # (T=W, N, C): time first, as CTC wants

    path = export(Crnn(), tmp_path / "crnn.onnx", shape=(1, 3, 8, 24))
    b = dv.load_backend("onnx", path=str(path))
    assert list(b.not_layers.values()) == ["shape (24, 2, 6) at a batch of 2: its batch is axis 1, not 0; "
                                           "the tools read values of shape (N, C, ...)"]
    r = subprocess.run(["deepvis-inspect", "backend=onnx", f"backend.path={path}"], capture_output=True, text=True)
    assert r.returncode == 0 and "not a layer: " in r.stdout and "its batch is axis 1" in r.stdout, r.stderr


def test_an_unconvertible_node_deep_in_a_graph_is_named_with_the_cut_before_it(tmp_path, photos):
    """Issue 35 item 8: a converter's own refusal ('spatial rank == -2') named no node and no
    backend.until; and until= takes the node's name as the file writes it."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1], name="stem/conv"),
         helper.make_node("Relu", ["a"], ["b"], name="stem/relu"),
         helper.make_node("Selu", ["b"], ["y"], alpha=2.0, name="head/selu")],  # a Selu onnx2torch refuses
        "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    path = tmp_path / "deep.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(DeepvisError) as e:
        dv.load_backend("onnx", path=str(path), mean=[0] * 3, std=[1] * 3)
    msg = str(e.value)
    assert "(Selu) cannot be converted by onnx2torch (alpha parameter must be" in msg and "backend.until=" in msg
    until = msg.rsplit("backend.until=", 1)[1]
    for cut in (until, "stem/relu"):  # the suggested name, and the file's own node name
        b = dv.load_backend("onnx", path=str(path), mean=[0] * 3, std=[1] * 3, until=cut)
        with torch.no_grad():
            out = b.forward(b.preprocess(photos["coffee"]), [b.layers[-1]])[b.layers[-1]]
        assert out.shape == (1, 4, 16, 16) and out.min() >= 0  # the Relu's output


def test_a_channels_last_output_after_a_transpose_is_read_as_channels_last(tmp_path, photos):
    """Issue 35 item 6: a Keras export's prob, (19, 19, 2) after a Transpose, was read as 19
    channels: units addressed rows. The layout tracer follows the Transpose."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2], name="to_nchw"),
         helper.make_node("Conv", ["t", "w"], ["c"], strides=[2, 2], name="conv"),
         helper.make_node("Transpose", ["c"], ["c_nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
         helper.make_node("Softmax", ["c_nhwc"], ["prob"], axis=-1, name="softmax")],
        "keras_pnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 39, 39, 3])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    path = tmp_path / "pnet.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    b = dv.load_backend("onnx", path=str(path), mean=[127.5] * 3, std=[128] * 3)
    last = b.layers[-1]
    lay = b.layer_layout(last)
    assert lay.kind == "hwc" and lay.channels == 2 and lay.grid == (19, 19)
    x = b.preprocess(photos["coffee"])
    theirs = pytest.importorskip("onnxruntime").InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.permute(0, 2, 3, 1).numpy() / 128.0})[0]  # (1, 19, 19, 2)
    with torch.no_grad():
        ours = b.forward(x, [last])[last]  # the canonical view: (1, 2, 19, 19)
    assert ours.shape == (1, 2, 19, 19) and np.allclose(ours.numpy(), theirs.transpose(0, 3, 1, 2), atol=1e-5)


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):  # every position scaled by a gate of the whole map: a global field
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.se1 = nn.Conv2d(3, 16, 3, 2, 1), SqueezeExcite(16)
        self.c2, self.se2 = nn.Conv2d(16, 32, 3, 2, 1), SqueezeExcite(32)

    def forward(self, x):
        return self.se2(torch.relu(self.c2(self.se1(torch.relu(self.c1(x))))))


class UNet(nn.Module):
    """Down twice, up twice (nearest, then bilinear), skips: upsampled layers' neighbouring units
    share fields, which sent the two-unit probe through every canvas up to 2,368 px."""

    def __init__(self):
        super().__init__()
        self.d1, self.d2, self.d3 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1)
        self.u2, self.u1 = nn.Conv2d(48, 16, 3, 1, 1), nn.Conv2d(24, 8, 3, 1, 1)

    def forward(self, x):
        a = torch.relu(self.d1(x))
        b = torch.relu(self.d2(a))
        c = torch.relu(self.d3(b))
        d = torch.relu(self.u2(torch.cat([nn.functional.interpolate(c, scale_factor=2.0), b], 1)))
        up = nn.functional.interpolate(d, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.u1(torch.cat([up, a], 1))


def _hooked(model, layers, size):
    from deepvis_repro.backend import HookBackend

    torch.manual_seed(0)
    return HookBackend(model.eval(), [(n, n) for n in layers], to_input=lambda x: x / 255, mean=torch.zeros(3),
                       input_size=(size, size), prob=False, name=type(model).__name__)


def test_receptive_fields_of_se_and_unet_layers_are_found_in_bounded_time():
    """Issue 35 item 1: the probe tried every margin up to a 2,368 px canvas (737 s, 14.2 GB on a
    text detector) and fell back to 'whole image' without a word. A field that spans every canvas
    is decided global; an upsampled layer's field is the affine box that holds its units' fields;
    every geometry says how it was found (the manifest stores it)."""
    from deepvis_repro.atlas.receptive import _support_boxes, layer_geometry

    se = _hooked(SENet(), ["c1", "se1", "c2", "se2"], 96)
    assert layer_geometry(se, "c1").method == "probe" and layer_geometry(se, "c1").size_y == 3
    for layer in ("se1", "c2", "se2"):
        g = layer_geometry(se, layer)
        assert g.whole and not g.clipped and g.method == "global: the field spans every canvas", layer
    unet = _hooked(UNet(), ["d3", "u2", "u1"], 64)
    assert (layer_geometry(unet, "d3").size_y, layer_geometry(unet, "d3").stride_y) == (9, 4)
    for layer, stride in (("u2", 2), ("u1", 1)):
        g = layer_geometry(unet, layer)
        assert g.method.startswith("probe, ") and g.stride_y == g.stride_x == stride and not g.whole, layer
        # every unit's own field (its gradient's support on the input) lies in the box said
        for y, x in ((5, 7), (6, 6), (9, 10), (12, 3)):
            (box,) = _support_boxes(unet, layer, (64, 64), lambda h, w, y=y, x=x: [(y, x)])
            t, l, b, r = g.box(y, x)
            assert t <= box[0] and l <= box[1] and b >= box[2] and r >= box[3], (layer, y, x, box, g.box(y, x))
        assert g.size_y <= 32  # and not the whole input: a box, not a fallback
    # bounded: on a 320 px U-Net and SE net no layer's probe builds a canvas beyond 448 px (the SE
    # layers are decided global on the second canvas; the U-Net's fields fit the first). Their time
    # and peak memory: python benchmarks/bench_receptive.py (README).
    import deepvis_repro.atlas.receptive as rf

    canvases = []
    real = rf._support_boxes

    def recording(backend, layer, canvas, units_at):
        canvases.append(canvas)
        return real(backend, layer, canvas, units_at)

    rf._support_boxes = recording
    try:
        for m, layers in ((SENet(), ["c1", "se1", "c2", "se2"]), (UNet(), ["d1", "d2", "d3", "u2", "u1"])):
            b = _hooked(m, layers, 320)
            for layer in layers:
                layer_geometry(b, layer)
    finally:
        rf._support_boxes = real
    assert max(max(c) for c in canvases) <= 448 and len(canvases) <= 2 * 9


class WideVGG(nn.Module):
    """Plain convolutions, ReLUs and average pooling (a max-pooling switch between equal values
    in a photo's flat regions is decided by float rounding, which a crop's size changes), like a
    detector's VGG trunk."""

    def __init__(self, ramp: bool = False):
        super().__init__()
        self.ramp = ramp
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        self.c2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        self.c3 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())

    def forward(self, x):
        if self.ramp:  # a position-dependent input scaling (0..1 across the image, whatever its size)
            x = x * torch.linspace(0, 1, x.shape[-1], device=x.device)
        return self.c3(self.c2(self.c1(x)))


def _views(backend, n=4):
    from deepvis_repro.atlas.corpus import demo_corpus
    from deepvis_repro.atlas.patches import ViewCache

    return dict(enumerate(ViewCache(demo_corpus().items[:n], backend.view_spec()).get_many(range(n))))


def test_a_units_deconv_on_its_field_equals_the_whole_images():
    """Issue 35 item 9: a wide layer's montages ran a full-image backward pass per patch (0.26
    units/s on a 320 px VGG's 256 channels). On its receptive field, batched, the deconv of every
    patch, borders included, is the full image's (float rounding apart)."""
    from deepvis_repro.atlas.field_backprop import field_backprop, field_backprop_holds
    from deepvis_repro.atlas.patches import shared_backprop
    from deepvis_repro.atlas.receptive import layer_geometry

    torch.manual_seed(0)
    b = _hooked(WideVGG(), ["c3"], 160)
    g = layer_geometry(b, "c3")
    assert (g.size_y, g.stride_y) == (18, 4)
    views = _views(b)
    rng = np.random.default_rng(0)
    pairs = [(int(i), int(c), (int(y), int(x))) for i, c, y, x in
             zip(rng.integers(0, 4, 40), rng.integers(0, 32, 40), rng.integers(0, 40, 40), rng.integers(0, 40, 40))]
    pairs += [(0, 3, (0, 0)), (1, 4, (39, 39)), (2, 5, (0, 39)), (3, 6, (39, 0))]
    assert field_backprop_holds(b, "c3", g, "guided") == "field"
    full, crop = {}, {}
    shared_backprop(b, views, pairs, "c3", lambda k, v: full.__setitem__(k, v.copy()), "guided")
    field_backprop(b, views, pairs, "c3", g, lambda k, v, at: crop.__setitem__(k, (v.copy(), at)), "guided",
                   pixels=12 * 22 * 22)  # several passes, with border crops of other sizes among them
    assert sorted(crop) == list(range(len(pairs)))
    live = 0
    for k, v in full.items():
        c, (t, l) = crop[k]
        assert c.shape[0] < 30 and c.shape[1] < 30  # a crop, not the image
        pasted = np.zeros_like(v)
        pasted[t:t + c.shape[0], l:l + c.shape[1]] = c
        live += np.abs(v).max() > 0  # guided backprop: a unit that is off here has none
        np.testing.assert_allclose(pasted, v, rtol=0, atol=1e-5 * np.abs(v).max())
    assert live >= 10  # (18 of the 44 here)


def test_montages_use_the_field_where_it_holds_and_say_why_not(tmp_path):
    """The crop path is checked per layer against the full image: a position-dependent model
    (which accepts any size) and a fixed-size one fall back to the whole image; the manifest
    says which way each layer's deconvs were computed, and the pictures are the same."""
    import json

    from deepvis_repro.atlas import mine
    from deepvis_repro.atlas.corpus import demo_corpus
    from deepvis_repro.atlas.patches import render_montages
    from deepvis_repro.atlas.store import AtlasStore

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(demo_corpus().items[:12]))
    files = {}
    torch.manual_seed(0)
    for name, model in (("plain", WideVGG()), ("ramp", WideVGG(ramp=True))):
        b = _hooked(model, ["c3"], 160)
        mine(b, str(corpus), ["c3"], top_k=4, batch_size=6, atlas_dir=tmp_path / name, progress=False)
        assert render_montages(b, tmp_path / name, units=range(6), progress=False) == {"c3": 6}
        how = json.loads((tmp_path / name / "manifest.json").read_text())["montages"]["c3"]["backprop"]
        assert how == ("field" if name == "plain" else
                       "whole image: a crop's gradients differ from the full image's (position-dependent layers)")
        files[name] = AtlasStore(tmp_path / name).unit_file("max_deconv", "c3", 2)
        if name == "plain":  # the same units on the whole image: the same montage, within JPEG's rounding
            first = np.asarray(Image.open(files[name])).astype(int)
            os.remove(files[name])
            os.remove(AtlasStore(tmp_path / name).unit_file("max_im", "c3", 2))
            b.cache("field_backprop")[("c3", "guided")] = "whole image: asked"
            render_montages(b, tmp_path / name, units=[2], progress=False)
            again = np.asarray(Image.open(files[name])).astype(int)
            assert np.abs(first - again).max() <= 2

    class FixedSize(WideVGG):
        def forward(self, x):
            assert x.shape[-1] == 160, "this model takes 160 px only"
            return super().forward(x)

    b = _hooked(FixedSize(), ["c3"], 160)
    from deepvis_repro.atlas.field_backprop import field_backprop_holds
    from deepvis_repro.atlas.receptive import layer_geometry

    assert field_backprop_holds(b, "c3", layer_geometry(b, "c3"), "guided") == \
        "whole image: the model refused a crop (AssertionError)"


def test_one_number_is_a_square_input_size():
    """``backend.input_size=320`` (as a user writes it) was a TypeError from inside Hydra with
    torchvision and timm backends: one number is a square, for every backend; nonsense is one line."""
    assert dv.load_backend("torchvision", arch="alexnet", input_size=160).input_size == (160, 160)
    assert dv.load_backend("timm", model="resnet18", input_size="96").input_size == (96, 96)
    assert dv.load_backend(input_size=192).input_size == (192, 192)
    with pytest.raises(DeepvisError, match=r"input size 'x' \(EfficientNet-lite0\) must be \[height, width\] or one"):
        dv.load_backend(input_size="x")
