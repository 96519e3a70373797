"""The torchvision backend (random init and local state dicts) and third-party plugins."""
import sys

import pytest
import torch
import torchvision

import deepvis_repro as dv
from deepvis_repro.errors import DeepvisError


def test_alexnet_random_init_with_caffe_aliases():
    b = dv.load_backend("torchvision", arch="alexnet", weights=None)
    assert b.layers[:3] == ["features.0", "features.1", "features.2"] and b.layers[-1] == "prob"
    assert not any("Dropout" in type(b.module.get_submodule(p)).__name__ for p in b.layers[:-1])
    with torch.no_grad():
        out = b.forward(torch.randn(2, 3, 224, 224) * 50, ["conv1", "conv5", "fc8", "prob"])
    assert out["conv1"].shape == (2, 64, 55, 55) and out["fc8"].shape == (2, 1000)
    # Caffe's conv1 blob is post-ReLU (in-place ReLU), so the alias is too
    assert float(out["conv1"].min()) >= 0 and float(out["conv5"].min()) >= 0
    assert torch.allclose(out["prob"], torch.softmax(out["fc8"], 1))


def test_resnet_local_state_dict_round_trip(tmp_path, photos):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    b = dv.load_backend("torchvision", arch="resnet18", weights=str(path))
    assert "layer3.1" in b.layers and b.layers.index("layer2.0") < b.layers.index("layer3.0")
    x = b.preprocess(photos["chelsea"])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref(((x + b.mean) / 255.0 - mean) / std)
        got = b.forward(x, ["fc"])["fc"]
    assert torch.allclose(got, expected, atol=1e-4)


def test_state_dict_for_wrong_arch_is_a_clear_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(DeepvisError, match="does not fit torchvision alexnet"):
        dv.load_backend("torchvision", arch="alexnet", weights=str(path))
    with pytest.raises(DeepvisError, match="unknown torchvision arch 'alexnt'.*alexnet"):
        dv.load_backend("torchvision", arch="alexnt")


PLUGIN = '''
import torch
from torch import nn
from deepvis_repro.backend import HookBackend


class TinyBackend(HookBackend):
    """A two-layer net of a third party's own."""
    def __init__(self, width=4, device="cpu"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))
        super().__init__(net, [("conv", "1"), ("logits", "4")], to_input=lambda x: x / 255.0,
                         mean=[120.0, 110.0, 100.0], input_size=(32, 32),
                         labels=["a", "b", "c"], name="tiny", device=device)
'''


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """A third-party package with an entry point in the group deepvis_repro.backends."""
    (tmp_path / "tiny_vis_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "tiny_vis_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-vis-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[deepvis_repro.backends]\ntiny = tiny_vis_plugin:TinyBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("tiny_vis_plugin", None)


def test_entry_point_plugin_loads_through_load_backend(plugin_package):
    assert "tiny" in dv.list_backends()
    b = dv.load_backend("tiny", width=6)
    assert b.layers == ["conv", "logits", "prob"]
    out = b.forward(torch.zeros(1, 3, 32, 32), ["conv"])
    assert out["conv"].shape == (1, 6, 32, 32)


def test_yaml_target_plugin(plugin_package, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("_target_: tiny_vis_plugin.TinyBackend\nwidth: 5\n")
    b = dv.load_backend(str(cfg))
    assert b.forward(torch.zeros(1, 3, 32, 32), ["conv"])["conv"].shape[1] == 5
    assert dv.load_backend(str(cfg), width=2).forward(torch.zeros(1, 3, 32, 32), ["conv"])["conv"].shape[1] == 2
    with pytest.raises(DeepvisError, match="bogus"):
        dv.load_backend(str(cfg), bogus=1)


def test_until_keeps_the_backbone_only(photos):
    """backend.until=LAYER on the embedded model: the layers end there, the head never runs, and
    without the class scores there are no classes (the kept layer's channels are not ImageNet's)."""
    b = dv.load_backend(until="blocks.10")
    assert b.layers[-1] == "blocks.10" and b.labels is None and b.output_layer == "blocks.10"
    with pytest.raises(DeepvisError, match="fc"):
        b.resolve_layer("fc")
    full = dv.load_backend()
    x = full.preprocess(photos["chelsea"])
    with torch.no_grad():
        assert torch.equal(b.forward(x, ["blocks.10"])["blocks.10"], full.forward(x, ["blocks.10"])["blocks.10"])
    assert dv.load_backend(until="fc").labels is not None  # cut at the class scores: classes kept
