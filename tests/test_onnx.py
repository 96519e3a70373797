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
