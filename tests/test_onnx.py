"""The onnx backend on an exported torchvision model, and an unsupported operator."""
import warnings

import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper

import deepvis_repro as dv
from deepvis_repro.errors import DeepvisError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=["data"], output_names=["logits"], dynamic_axes={"data": {0: "n"}})
    return model, path


def test_exported_torchvision_model_matches_torch(exported, photos):
    model, path = exported
    b = dv.load_backend("onnx", path=str(path), labels="imagenet")
    assert b.input_size == (224, 224) and b.layers[-1] == "prob"
    assert b.layers[0] == "conv1/Conv" and any(l.startswith("layer3/") for l in b.layers)
    x = torch.cat([b.preprocess(photos["chelsea"]), b.preprocess(photos["coffee"])])  # a batch of 2
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model(((x + b.mean) / 255 - mean) / std)
        got = b.forward(x, [b.layers[-2], "prob"])
    assert torch.allclose(got[b.layers[-2]], want, atol=1e-4)
    assert torch.allclose(got["prob"], torch.softmax(want, 1), atol=1e-6)


def test_unsupported_operator_is_named(tmp_path):
    node = helper.make_node("MadeUpOp", ["data"], ["out"], domain="")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])])
    path = tmp_path / "madeup.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(DeepvisError, match=r"madeup.onnx uses operator MadeUpOp \(opset 17\)"):
        dv.load_backend("onnx", path=str(path))
    (tmp_path / "junk.onnx").write_bytes(b"\x01\x02not onnx at all")
    with pytest.raises(DeepvisError, match="cannot read ONNX file"):
        dv.load_backend("onnx", path=str(tmp_path / "junk.onnx"))
    with pytest.raises(DeepvisError, match="ONNX file not found"):
        dv.load_backend("onnx", path=str(tmp_path / "none.onnx"))


def _keras_style(path, pool_mode="SAME_UPPER"):
    """A graph as keras2onnx / tf2onnx write it: NHWC input, a Transpose to NCHW, convolutions and
    a max-pool with auto_pad SAME_UPPER / SAME_LOWER / VALID (odd totals: asymmetric pads), PRelu,
    global pooling, a dense layer and a softmax."""
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Transpose", ["data"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], strides=[2, 2], kernel_shape=[3, 3],
                         auto_pad="SAME_UPPER", name="conv1"),
        helper.make_node("PRelu", ["c1", "slope"], ["a1"], name="prelu1"),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], auto_pad=pool_mode,
                         name="pool1"),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[2, 2], auto_pad="SAME_LOWER", name="conv2"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("Conv", ["a2", "w3"], ["c3"], kernel_shape=[3, 3], auto_pad="VALID", name="conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wd", "bd"], ["logits"], transB=1, name="dense"),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1, name="softmax"),
    ]
    inits = [w("w1", 8, 3, 3, 3), w("b1", 8), w("slope", 8, 1, 1), w("w2", 12, 8, 2, 2), w("w3", 16, 12, 3, 3),
             w("wd", 5, 16), w("bd", 5)]
    graph = helper.make_graph(nodes, "keras_style", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                                   [1, 37, 37, 3])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("pool_mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_keras_style_auto_pad_matches_onnxruntime(tmp_path, photos, pool_mode):
    """auto_pad=SAME_* (refused by onnx2torch) is written as explicit pads: every layer of an
    odd-sized NHWC graph (37 px: totals of 1 and 3 pixels, put at the end or the start) equals
    onnxruntime's value of the same tensor."""
    import numpy as np
    import onnxruntime as ort

    path = _keras_style(tmp_path / "keras.onnx", pool_mode)
    b = dv.load_backend("onnx", path=str(path), mean=[127.5] * 3, std=[127.5] * 3, crop=False)
    assert b.input_size == (37, 37) and "pool1" in b.layers
    x = b.preprocess(photos["coffee"])
    with torch.no_grad():
        got = b.forward(x, ["conv1", "pool1", "conv2", "conv3", "prob"])
    # onnxruntime on the file as written (auto_pad intact), asked for the same intermediate values
    m = onnx.load(str(path))
    m.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c1", "p1", "c2", "c3")])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    nhwc = (x / 127.5).permute(0, 2, 3, 1).numpy()
    ref = dict(zip(["prob", "c1", "p1", "c2", "c3"], sess.run(None, {"data": nhwc})))
    for layer, name in (("conv1", "c1"), ("pool1", "p1"), ("conv2", "c2"), ("conv3", "c3"), ("prob", "prob")):
        assert got[layer].shape == ref[name].shape, layer
        np.testing.assert_allclose(got[layer].numpy(), ref[name], rtol=1e-4, atol=1e-5, err_msg=layer)


def test_auto_pad_on_an_input_of_unknown_size_takes_the_given_size(tmp_path):
    """SAME padding depends on the input's size: a dynamic input is padded for backend.input_size
    (issue 35: it was refused even with the size given); without one, one line says to give it."""
    node = helper.make_node("MaxPool", ["data"], ["out"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER",
                            name="pool")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(DeepvisError, match=r"has no fixed input size; give backend.input_size"):
        dv.load_backend("onnx", path=str(path))
    b = dv.load_backend("onnx", path=str(path), input_size=[31, 32])
    assert b.layer_layout(b.layers[0]).canonical_shape() == (3, 16, 16)  # ceil(31 / 2), ceil(32 / 2)


def _opset18(path, pad_axes=False):
    """An opset-18 graph as newer exporters write it: Pad (opset 18's version, optionally with its
    new axes input) and ReduceMean with its axes as an input (opset 18's form), after a Conv."""
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    pad_inputs = ["c", "pads"]
    if pad_axes:
        inits[1] = numpy_helper.from_array(np.array([1, 2, 2, 1], np.int64), "pads")
        pad_inputs = ["c", "pads", "", "axes"]
    nodes = [helper.make_node("Conv", ["data", "w"], ["c"], kernel_shape=[3, 3], name="conv"),
             helper.make_node("Pad", pad_inputs, ["p"], mode="reflect", name="pad"),
             helper.make_node("Relu", ["p"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=0, name="mean")]
    graph = helper.make_graph(nodes, "opset18", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 20, 20])],
                              [helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 6])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_opset18_file_without_a_version_adapter_is_read_as_opset17(tmp_path, photos):
    """onnx's version converter has no 18 -> 17 adapter for Pad: a file whose nodes mean the same at
    opset 17 is read as such, and every layer equals onnxruntime's on the file as written."""
    import numpy as np
    import onnxruntime as ort
    from onnx import version_converter

    path = _opset18(tmp_path / "new.onnx")
    with pytest.raises(Exception):  # the premise: the converter cannot take this file down
        version_converter.convert_version(onnx.load(str(path)), 17)
    b = dv.load_backend("onnx", path=str(path), mean=[0.0] * 3, std=[255.0] * 3, crop=False)
    x = b.preprocess(photos["astronaut"])
    with torch.no_grad():
        got = b.forward(x, ["pad", "mean"])
    m = onnx.load(str(path))
    m.graph.output.extend([helper.make_tensor_value_info("p", TensorProto.FLOAT, None)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want_m, want_p = sess.run(None, {"data": (x / 255.0).numpy()})
    np.testing.assert_allclose(got["pad"].numpy(), want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["mean"].numpy(), want_m, rtol=1e-5, atol=1e-6)


def test_opset18_node_using_what_opset17_lacks_is_named(tmp_path):
    path = _opset18(tmp_path / "axes.onnx", pad_axes=True)
    with pytest.raises(DeepvisError, match=r"axes.onnx \(opset 18\): node pad \(Pad\): uses input axes, added after "
                                           r"opset 17"):
        dv.load_backend("onnx", path=str(path))
