"""The ONNX route for Caffe models: deepvis-convert writes a clean, checked ONNX file; the ONNX
route (onnx2torch) and onnxruntime running that file equal the direct Caffe backend on every blob,
on CaffeNet-, ResNet- and otherwise-shaped models built here, fed real photos."""
import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import deepvis_repro as dv
from deepvis_repro.layout import canonical
from caffe_models import (activations_shaped, caffenet_shaped, mixed_shaped, random_weights, resnet_shaped,
                          shaping_shaped, write_model)

ort = pytest.importorskip("onnxruntime")

#: (model, seed, the net's transform_param scale): raw 0..255 pixels as CaffeNet, or 1/255 as many
MODELS = {"caffenet": (caffenet_shaped, 2, 1.0), "resnet": (resnet_shaped, 3, 1.0),
          "mixed": (mixed_shaped, 1, 1 / 255), "activations": (activations_shaped, 4, 1 / 255),
          "shaping": (shaping_shaped, 7, 1 / 255)}


def convert(proto, weights, out, *extra):
    return subprocess.run(["deepvis-convert", "backend=caffe", f"backend.prototxt={proto}",
                           f"backend.weights={weights}", "backend.cache_dir=", f"output={out}", *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request, tmp_path_factory):
    shape, seed, scale = MODELS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    layers, size = shape()
    blobs, _ = random_weights(layers, size, seed=seed)
    proto, weights = write_model(layers, size, blobs, d)
    r = convert(proto, weights, d / "net.onnx", f"backend.input_scale={scale}")
    assert r.returncode == 0, r.stderr
    assert "onnx.checker (full check) passed" in r.stdout
    direct = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir="", input_scale=scale)
    return request.param, d, proto, weights, scale, direct


def photos_batch(backend, photos):
    return torch.cat([backend.preprocess(photos[n]) for n in ("chelsea", "coffee", "astronaut", "rocket")])


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape and a.size == b.size:  # an (N, C, L) blob, which backends show as (N, C, 1, L)
        assert 3 in (a.ndim, b.ndim) and sorted([a.ndim, b.ndim]) == [3, 4], (a.shape, b.shape)
        b = b.reshape(a.shape)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-6))


def test_the_file_is_clean_onnx(converted):
    name, d, proto, weights, scale, direct = converted
    m = onnx.load(str(d / "net.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in m.graph.input] == ["data"]  # weights are initializers, not inputs
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [x.dim_value for x in dims[1:]] == [3, *direct.input_size]
    assert {n.op_type for n in m.graph.node} <= {"Conv", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "MaxPool",
                                                  "AveragePool", "Pad", "Mul", "Add", "Max", "LRN", "Flatten", "Gemm",
                                                  "Softmax", "BatchNormalization", "Concat", "ReduceMax",
                                                  "GlobalAveragePool", "Identity", "ConvTranspose", "PRelu", "Elu",
                                                  "Abs", "Pow", "Split", "Slice", "ReduceSumSquare", "Sqrt",
                                                  "Div", "Transpose", "Reshape"}
    produced = {o: n for n in m.graph.node for o in n.output}
    for blob in direct.layers:  # every blob is a value of the graph, under its Caffe name
        assert blob in produced, blob
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["deepvis.channel_order"] == "BGR" and json.loads(meta["deepvis.blobs"]) == direct.layers
    assert json.loads(meta["deepvis.input_scale"]) == pytest.approx(scale)
    assert len(meta["deepvis.caffemodel_sha256"]) == 64 and meta["deepvis.source_prototxt"] == "net.prototxt"
    if name == "caffenet":  # in-place: the blob conv1 is the rectified value, as in Caffe
        assert produced["conv1"].op_type == "Relu" and produced["conv1/conv1"].op_type == "Conv"
    if name == "mixed":  # a Dropout that is not in place: its blob is addressable
        assert produced["drop"].op_type == "Identity"


def test_onnxruntime_equals_the_direct_route_on_every_blob(converted, photos):
    name, d, proto, weights, scale, direct = converted
    x = photos_batch(direct, photos)
    with torch.no_grad():
        want = direct.forward(x, direct.layers)
    m = onnx.load(str(d / "net.onnx"))
    have = {o.name for o in m.graph.output}
    for blob in direct.layers:
        if blob not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(blob))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    data = (x.index_select(1, torch.tensor([2, 1, 0])) * scale).numpy()  # the Caffe data blob: BGR, scaled
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"data": data})))
    # onnxruntime's values as the model computes them, in the view every tool reads (a Permute's
    # channels-last blob as its map)
    got = {b: canonical(torch.from_numpy(got[b]), direct.layer_layout(b))[0].numpy() for b in direct.layers}
    errors = {b: rel_err(want[b].numpy(), got[b]) for b in direct.layers}
    assert max(errors.values()) < 1e-5, errors


def test_the_onnx_route_presents_the_same_layers_and_values(converted, photos, tmp_path):
    name, d, proto, weights, scale, direct = converted
    via = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=str(tmp_path),
                          input_scale=scale, via="onnx")
    assert via.layers == direct.layers and via.name == "caffe:onnx"
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # converted once, cached
    again = dv.load_backend("caffe", prototxt=str(proto), weights=str(weights), cache_dir=str(tmp_path),
                            input_scale=scale, via="onnx")
    x = photos_batch(direct, photos)
    with torch.no_grad():
        want = direct.forward(x, direct.layers)
        got = via.forward(x, via.layers)
        got2 = again.forward(x, ["prob"])
    errors = {b: rel_err(want[b].numpy(), got[b].numpy()) for b in direct.layers}
    assert max(errors.values()) < 1e-5, errors
    assert torch.equal(got2["prob"], got["prob"])
    # the written file alone, no options: its metadata gives channel order, mean and scale
    plain = dv.load_backend("onnx", path=str(d / "net.onnx"))
    assert plain.layers == direct.layers
    with torch.no_grad():
        p = plain.forward(x, [direct.layers[-1]])[direct.layers[-1]]
    assert rel_err(want[direct.layers[-1]].numpy(), p.numpy()) < 1e-5


def test_via_onnx_from_the_command_line(converted, tmp_path):
    name, d, proto, weights, scale, direct = converted
    if name != "caffenet":
        pytest.skip("one model is enough here")
    rows = []
    for via in ("direct", "onnx"):
        r = subprocess.run(["deepvis-inspect", "backend=caffe", f"backend.prototxt={proto}", f"backend.weights={weights}",
                            f"backend.cache_dir={tmp_path}", f"backend.via={via}"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        rows.append([l.split()[:2] for l in r.stdout.splitlines()[2:]])
    assert rows[0] == rows[1]  # the same layer table: names and shapes
    r = subprocess.run(["deepvis-inspect", "backend=caffe", f"backend.prototxt={proto}", f"backend.weights={weights}",
                        "backend.via=tflite"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "via must be direct or onnx" in r.stderr


def test_bad_input_names_the_problem_and_leaves_no_file(tmp_path):
    layers, size = caffenet_shaped()
    blobs, _ = random_weights(layers, size, seed=4)
    proto, weights = write_model(layers, size, blobs, tmp_path)
    bad = tmp_path / "spp.prototxt"
    bad.write_text(proto.read_text().replace('type: "LRN"', 'type: "SPP"', 1))
    out = tmp_path / "out.onnx"
    r = convert(bad, weights, out)
    assert r.returncode == 2 and "unsupported layer 'norm1' of type SPP" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.onnx*"))
    r = convert(proto, weights, tmp_path / "out.txt")
    assert r.returncode == 2 and "output must be a .onnx file" in r.stderr
    r = subprocess.run(["deepvis-convert", "backend=caffe", f"backend.prototxt={proto}", f"backend.weights={weights}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "missing output: give output=PATH.onnx" in r.stderr
    r = subprocess.run(["deepvis-convert", "backend=efficientnet_lite0", f"output={out}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "deepvis-convert converts Caffe models" in r.stderr


def test_the_onnx_route_cache_is_checked_and_leaves_no_copies(converted, photos, tmp_path):
    """Issue 21: an edited weight in the cached .onnx was used, a truncated one was a hard error,
    and an unwritable cache left a model copy in the temporary folder on every run."""
    import tempfile

    name, d, proto, weights, scale, direct = converted
    args = dict(prototxt=str(proto), weights=str(weights), cache_dir=str(tmp_path), input_scale=scale, via="onnx")
    x = photos_batch(direct, photos)
    last = direct.layers[-1]
    with torch.no_grad():
        want = dv.load_backend("caffe", **args).forward(x, [last])[last]
    (cached,) = tmp_path.glob("*.onnx")
    m = onnx.load(str(cached))
    init = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    init.raw_data = bytes(len(init.raw_data))  # an edited weight, the file otherwise valid
    cached.write_bytes(m.SerializeToString())
    with torch.no_grad():
        assert torch.equal(dv.load_backend("caffe", **args).forward(x, [last])[last], want)  # rebuilt
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated
    with torch.no_grad():
        assert torch.equal(dv.load_backend("caffe", **args).forward(x, [last])[last], want)
    before = set(Path(tempfile.gettempdir()).glob("deepvis-onnx-*"))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    b = dv.load_backend("caffe", **{**args, "cache_dir": str(not_a_dir / "cache")})
    with torch.no_grad():
        assert rel_err(b.forward(x, [last])[last].numpy(), want.numpy()) < 1e-6
    assert set(Path(tempfile.gettempdir()).glob("deepvis-onnx-*")) == before  # no copy left behind
