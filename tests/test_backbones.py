"""Today's backbones (issue 32): each layer's layout traced from the model, one canonical view
(channels first, positions as a map, prefix tokens aside) that equals the model's own values
rearranged by the model's own metadata, transformer blocks listed, token units, timm's zoo as a
backend, and a layer whose layout cannot be decided refused in one line. Random weights (nothing
can be downloaded here): structure and numbers against the model's own forward pass."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import deepvis_repro as dv
from deepvis_repro.backend import PREFIX, HookBackend
from deepvis_repro.errors import DeepvisError
from deepvis_repro.units import layer_shapes, resolve_units, shown_layers

timm = pytest.importorskip("timm")
ENV = dict(os.environ, SDL_VIDEODRIVER="dummy")

#: small members of each family timm users pick from (random weights; shrunk where timm allows)
FAMILIES = {
    "vit_tiny_patch16_224": {"depth": 2},
    "deit_tiny_distilled_patch16_224": {"depth": 2},                    # distillation token
    "vit_tiny_patch16_224+reg": {"depth": 2, "reg_tokens": 4},          # register tokens
    "beit_base_patch16_224": {"depth": 2, "embed_dim": 192, "num_heads": 3},
    "swin_tiny_patch4_window7_224": {"depths": (2, 2, 2, 2), "embed_dim": 48, "num_heads": (3, 3, 3, 3)},
    "convnext_atto": {},
    "resnet18": {},
    "efficientnet_b0": {},
    "mobilenetv3_small_050": {},
    "mobilenetv4_conv_small": {},
    "regnetx_002": {},
    "mobilevit_xxs": {},                                                # hybrid: convolutions + attention
}


def timm_backend(key):
    name = key.split("+")[0]
    return dv.load_backend("timm", model=name, model_args=FAMILIES[key])


def run(*args, timeout=600):
    return subprocess.run(list(args), capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def photo_x():
    import skimage.data

    return skimage.data.chelsea()


@pytest.mark.parametrize("key", list(FAMILIES))
def test_timm_families_listed_with_their_own_geometry(key, photo_x):
    b = timm_backend(key)
    model = b.module
    x = b.preprocess(photo_x)
    shown = shown_layers(b)
    assert len(shown) >= 5 and b.layers[-1] == "prob"
    # every decided layer: the tools' view is the model's own value, only rearranged
    raw = {}
    handles = [model.get_submodule(b._paths[n]).register_forward_hook(
        lambda m, i, o, n=n: raw.setdefault(n, o[0] if isinstance(o, tuple) else o)) for n in shown if n != "prob"]
    with torch.no_grad():
        got = b.forward(x, shown)
    for h in handles:
        h.remove()
    prefix = getattr(model, "num_prefix_tokens", 0) if hasattr(model, "patch_embed") else 0
    for n in shown:
        if n == "prob":
            continue
        lay, v, r = b.layer_layout(n), got[n], raw[n]
        if lay.kind == "tokens":  # (N, P + gh*gw, C): the grid after the prefix tokens, row-major
            gh, gw = model.patch_embed.grid_size
            p = r.shape[1] - gh * gw  # the patch embedding has none, the blocks the model's own
            assert lay.grid == (gh, gw) and len(lay.prefix) == p and p in (0, prefix), (n, lay)
            want = r[:, p:].transpose(1, 2).reshape(1, r.shape[-1], gh, gw)
        elif lay.kind == "hwc":
            want = r.permute(0, 3, 1, 2)
        else:
            want = r
        assert torch.equal(v, want), (n, lay)
    if prefix:  # the prefix tokens, by name, as (N, C, P)
        blocks = [n for n in shown if n.startswith("blocks.") and n.count(".") == 1]
        with torch.no_grad():
            pre = b.forward(x, [blocks[-1] + PREFIX])[blocks[-1] + PREFIX]
        assert torch.equal(pre, raw[blocks[-1]][:, :prefix].transpose(1, 2))
        names = b.layer_layout(blocks[-1]).prefix
        assert names[0] == "cls"
        if "deit" in key:
            assert names == ("cls", "dist")
        if "reg" in key:
            assert names == ("cls", "reg0", "reg1", "reg2", "reg3")
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):  # a ViT: every block, its attention and its MLP are layers
        assert {"blocks.0", "blocks.0.attn", "blocks.0.mlp", "blocks.1"} <= set(shown)


def test_swin_stages_are_drawn_as_maps_not_rows(photo_x):
    """Swin's stages are (N, H, W, C): channel c of the view is the model's feature c over the
    grid. A perturbation of the top-left corner changes the top-left of every channel's map most:
    with channels and positions swapped, it would be a channel that changed."""
    b = timm_backend("swin_tiny_patch4_window7_224")
    layer = "layers.0.blocks.0"
    lay = b.layer_layout(layer)
    assert lay.kind == "hwc" and lay.grid == (56, 56) and lay.channels == 48
    assert layer_shapes(b, [layer])[layer] == (48, 56, 56)
    x = b.preprocess(photo_x)
    x2 = x.clone()
    x2[:, :, :8, :8] += 60
    with torch.no_grad():
        d = (b.forward(x2, [layer])[layer] - b.forward(x, [layer])[layer]).abs()[0]
    per_position = d.sum(0)  # (56, 56)
    assert per_position[:2, :2].sum() > 0 and per_position[8:, :].sum() == 0  # window-local, top-left
    assert d.sum((1, 2)).min() > 0  # every channel's map saw it


def test_a_swin_stage_gets_a_whole_input_field_not_an_error(photo_x):
    """Found this round: deepvis-mine on a Swin stage failed after mining ('cannot measure its
    receptive field'): under windowed attention a unit sees its window and its neighbour another,
    so no box and stride describe the layer. Such a layer is shown on the whole input, said so."""
    from deepvis_repro.atlas.receptive import layer_geometry

    # one block per stage: no shifted window joins neighbouring windows (with two, the centre
    # units' fields happen to line up and are measured, clipped at the input)
    b = dv.load_backend("timm", model="swin_tiny_patch4_window7_224",
                        model_args={"depths": (1, 1, 1, 1), "embed_dim": 48, "num_heads": (3, 3, 3, 3)})
    g = layer_geometry(b, "layers.1")
    assert g.whole and g.method.startswith("position-dependent")
    # a convolutional stage of the same library still gets its measured box (not the fallback)
    c = layer_geometry(timm_backend("resnet18"), "layer1.1")
    assert not c.whole and c.method == "probe" and c.stride_y == 4


def test_vit_tokens_are_drawn_on_the_patch_grid(photo_x):
    """A ViT block's channel is a 14x14 map over patches: the patch a perturbation touches moves
    its own token most (the residual stream), wherever it is."""
    b = timm_backend("vit_tiny_patch16_224")
    layer = "blocks.0"
    assert layer_shapes(b, [layer])[layer] == (192, 14, 14)
    x = b.preprocess(photo_x)
    for (py, px) in ((0, 0), (3, 11), (13, 5)):
        x2 = x.clone()
        x2[:, :, py * 16:(py + 1) * 16, px * 16:(px + 1) * 16] += 80
        with torch.no_grad():
            d = (b.forward(x2, [layer])[layer] - b.forward(x, [layer])[layer]).abs()[0].sum(0)
        assert tuple(np.unravel_index(int(d.argmax()), d.shape)) == (py, px)


def test_token_units_in_the_optimizer():
    b = timm_backend("deit_tiny_distilled_patch16_224")
    units = resolve_units(b, ["blocks.1:17", "blocks.1:17:3:4", "blocks.1:5:cls", "blocks.1:5:dist"])
    assert [str(u) for u in units] == ["blocks.1:17:7:7", "blocks.1:17:3:4", "blocks.1:5:cls", "blocks.1:5:dist"]
    with pytest.raises(DeepvisError, match="no prefix token 'reg0'; its prefix tokens: cls, dist"):
        resolve_units(b, ["blocks.1:5:reg0"])
    r = dv.optimize(b, units, preset="paper_3", steps=6, progress=False)
    first = dv.optimize(b, units, preset="paper_3", steps=1, progress=False)
    assert (r.best_activation > first.best_activation).all()
    for preset in ("lucid", "maco"):  # the successors on a ViT (MACO's paper shows ViTs)
        r = dv.optimize(b, ["blocks.1:5:cls"], preset=preset, steps=4, progress=False)
        assert np.isfinite(r.best_activation).all()


class Mixer(nn.Module):
    """Token mixing through an operation the layout tracer does not know (an FFT over the tokens):
    after it, which axis is which is not decided."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.mix = nn.Identity()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (N, 16, 8)
        t = self.mix(torch.fft.fft(t, dim=1).real)
        return self.fc(t.mean(1))


def test_a_layer_of_unknown_layout_is_listed_and_refused():
    m = Mixer()
    b = HookBackend(m, [("embed", "embed"), ("mix", "mix"), ("fc", "fc")], to_input=lambda x: x / 255,
                    mean=[128.0] * 3, input_size=(32, 32))
    assert b.layer_layout("embed").kind == "chw"
    lay = b.layer_layout("mix")
    assert lay.kind == "unknown" and lay.raw == (16, 8)
    # nothing downstream of an unknown operation is decided either (its batch axis included)
    assert b.layer_layout("fc").kind == "unknown"
    assert shown_layers(b) == ["embed", "prob"]
    with pytest.raises(DeepvisError, match="layer mix of .* cannot be shown or optimized: its layout is unknown"):
        resolve_units(b, ["mix:1"])


def test_torchvision_transformers_list_their_blocks():
    for arch, layer, shape, kind in (("vit_b_16", "encoder.layers.encoder_layer_3", (768, 14, 14), "tokens"),
                                     ("swin_t", "features.3.1", (192, 28, 28), "hwc"),
                                     ("convnext_tiny", "features.5.2", (384, 14, 14), "chw")):
        b = dv.load_backend("torchvision", arch=arch)
        assert layer in b.layers and layer_shapes(b, [layer])[layer] == shape
        assert b.layer_layout(layer).kind == kind
    b = dv.load_backend("torchvision", arch="vit_b_16")
    assert b.layer_layout("encoder.layers.encoder_layer_3").prefix == ("cls",)
    assert {"encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_0.mlp"} <= set(b.layers)
    # its zero-initialized head has no gradient: the lr is calibrated on a layer that responds
    assert np.isfinite(b.calibrated_lr_scale) and b.calibrated_lr_scale > 0


def test_every_tool_on_a_vit(tmp_path, photo_x):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    import skimage.data

    for name in ("chelsea", "coffee", "astronaut"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    args = ["backend=timm", "backend.model=vit_tiny_patch16_224", "backend.model_args={depth:2}"]
    r = run("deepvis-inspect", *args)
    assert r.returncode == 0 and "tokens 14x14 + cls" in r.stdout, r.stderr
    r = run("deepvis-optimize", *args, "units=[blocks.1:3,blocks.1:3:cls]", "optimize.steps=3",
            f"hydra.run.dir={tmp_path / 'opt'}")
    assert r.returncode == 0, r.stderr
    atlas = tmp_path / "atlas"
    r = run("deepvis-mine", *args, f"corpus.path={folder}", "layers=[blocks.1]", "top_k=2", "engine.workers=0",
            f"atlas.dir={atlas}")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((atlas / "manifest.json").read_text())
    assert len(list((atlas / "max_im" / "blocks.1").glob("*.jpg"))) == 192
    shot, stats = tmp_path / "live.png", tmp_path / "s.json"
    r = run("deepvis-live", *args, "source=images", f"source.path={folder}", "live.max_frames=6",
            "live.layer=blocks.1", "live.keys=[b,b]", f"live.screenshot={shot}", f"live.stats={stats}")
    assert r.returncode == 0 and shot.is_file(), r.stderr
    assert json.loads(stats.read_text())["error"] is None
    r = run("deepvis-reproduce", *args, "profile.steps=2", "profile.classes=[130]", "profile.hidden=[[0.5,3]]",
            "profile.settings=[paper_3,lucid]", "references=none", "judge=null", f"hydra.run.dir={tmp_path / 'rep'}")
    assert r.returncode == 0 and "References: not compared" in r.stdout, r.stderr
    assert manifest


def _live_pass(backend, layer, photo, **settings):
    """One network pass of the live view (its network thread's work), on a photo."""
    from deepvis_repro.live.network import Network
    from deepvis_repro.live.settings import ViewSettings

    layers = shown_layers(backend)
    s = ViewSettings(layer=layers.index(layer), **settings)
    return Network(backend, None, lambda: s, layers=layers).compute(photo, 1, s)


def test_live_view_shows_attention_from_the_units_strongest_patch_and_the_prefix_tokens(photo_x):
    """Issue 32: attention maps in the live view (x), prefix tokens beside the patch map, and the
    back modes' rule for GELU said. The maps are the model's own softmax (timm's unfused path)."""
    b = timm_backend("deit_tiny_distilled_patch16_224")
    layer, unit = "blocks.1", 7
    snap = _live_pass(b, layer, photo_x, unit=unit, attention=True, back=2)
    assert snap.layout == "tokens 14x14 + cls, dist" and not snap.warning
    assert [name for name, _, _ in snap.prefix] == ["cls", "dist"]
    x = b.preprocess(photo_x)
    with torch.no_grad():
        acts = b.forward(x, [layer, layer + PREFIX])
    assert [v for _, _, v in snap.prefix] == pytest.approx(acts[layer + PREFIX][0, unit].tolist(), rel=1e-6)
    # the query: the patch where the unit is strongest; the keys: the 14x14 patches
    y, xx = np.unravel_index(int(acts[layer][0, unit].argmax()), (14, 14))
    assert snap.attention.startswith(f"attention of patch ({y}, {xx}), where unit {unit} is strongest: 3 heads")
    attn = b.module.blocks[1].attn
    attn.fused_attn, seen = False, []
    h = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            b.forward(x, [layer])
    finally:
        h.remove()
        attn.fused_attn = True
    own = seen[0][0, :, 2 + y * 14 + xx, 2:].reshape(3, 14, 14).numpy()  # 2 prefix tokens first
    assert snap.grid_rc == (2, 2) and snap.tile_hw == (14, 14)
    tiles = [snap.grid[1 + r * 15:15 + r * 15, 1 + c * 15:15 + c * 15] for r, c in ((0, 0), (0, 1), (1, 0))]
    rel = own / own.reshape(3, -1).max(1)[:, None, None]  # each head to its own peak (indiv boost 1) ...
    rel = (rel - rel.min()) / (rel.max() - rel.min())      # ... then the grid's one scale
    for head, tile in enumerate(tiles):
        assert np.abs(tile.astype(float) / 255 - rel[head]).max() < 0.01, head
    assert "GELU" in snap.back_note and "positive part" in snap.back_note
    # Swin's attention is within 7x7 windows of a channels-last map: said, never drawn on the grid
    swin = timm_backend("swin_tiny_patch4_window7_224")
    s = _live_pass(swin, "layers.0.blocks.0", photo_x, attention=True)
    assert "attention maps need a token layer on a patch grid; this one is channels-last" in s.warning
    assert not s.attention
    # a convolutional layer has none
    s = _live_pass(swin, shown_layers(swin)[0], photo_x, attention=True)
    assert "has no attention of its own" in s.warning


def test_onnx_exports_of_a_vit_read_as_tokens_or_name_their_fixed_batch(tmp_path, photo_x):
    """Issue 32: a ViT exported by torch.onnx.export was read as 197 channels; exported without a
    dynamic batch axis it was refused with a line that blamed the image size."""
    import warnings

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", depth=2, pretrained=False).eval()
    paths = {}
    for name, kw in (("dynamic", {"dynamic_axes": {"input": {0: "n"}}}), ("fixed", {})):
        paths[name] = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (torch.zeros(1, 3, 224, 224),), str(paths[name]), input_names=["input"],
                              output_names=["output"], dynamo=False, opset_version=17, **kw)
    b = dv.load_backend("onnx", path=str(paths["dynamic"]), mean=[127.5] * 3, std=[127.5] * 3)
    last = "blocks/blocks/1/Add_1"  # the second block's output, the residual stream
    assert b.layer_layout(last).describe() == "tokens 14x14 + cls"
    x = b.preprocess(photo_x)
    with torch.no_grad():
        got = b.forward(x, [last, last + PREFIX])
        tokens = m.blocks(m._pos_embed(m.patch_embed(x / 127.5)))  # the model's own residual stream
    want = tokens[0, 1:].T.reshape(192, 14, 14)
    assert torch.allclose(got[last][0], want, atol=1e-4) and torch.allclose(got[last + PREFIX][0, :, 0], tokens[0, 0], atol=1e-4)
    with pytest.raises(DeepvisError, match=r"runs only on a batch of 1 \(its graph fixes the batch size.*dynamic_axes"):
        dv.load_backend("onnx", path=str(paths["fixed"]), mean=[127.5] * 3, std=[127.5] * 3)


def test_a_token_units_montage_marks_its_patch_on_whole_images(tmp_path, photos):
    """Issue 32: a token's field after attention is the whole image, so its top images are whole
    images with the token's patch marked, and its back image lies over the photo."""
    from PIL import Image

    from deepvis_repro.atlas.mining import mine
    from deepvis_repro.atlas.patches import MARK_COLOR, render_montages, token_marks
    from deepvis_repro.atlas.receptive import layer_geometry
    from deepvis_repro.atlas.store import AtlasStore

    b = timm_backend("vit_tiny_patch16_224")
    paths = []
    for name in ("chelsea", "coffee", "astronaut"):
        paths.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(photos[name]).save(paths[-1])
    mine(b, paths, ["blocks.1"], top_k=1, progress=False, atlas_dir=tmp_path / "A")
    render_montages(b, tmp_path / "A", units=[5], progress=False, tile=112)
    st = AtlasStore(tmp_path / "A")
    y, x = st.layer_arrays("blocks.1")["positions"][5, 0]
    (t, l, bt, r), = token_marks(b, "blocks.1", layer_geometry(b, "blocks.1"), [(y, x)], 112)
    assert (bt - t, r - l) == (8, 8)  # one patch of 16 px at 112 / 224
    for kind in ("max_im", "max_deconv"):
        tile = np.asarray(Image.open(st.unit_file(kind, "blocks.1", 5)))[2:114, 2:114].astype(int)  # JPEG
        edge = np.concatenate([tile[t, l:r], tile[bt - 1, l:r], tile[t:bt, l], tile[t:bt, r - 1]])
        assert np.abs(edge - MARK_COLOR).mean() < 40, kind  # the outline, in the mark's colour
        assert np.abs(tile[t + 3:bt - 3, l + 3:r - 3] - MARK_COLOR).mean() > 60, kind  # the patch itself shows


@pytest.mark.parametrize("key", list(FAMILIES) + ["tv:vit_b_16", "tv:swin_t", "tv:convnext_tiny"])
def test_every_tool_runs_on_every_family(key, photos, tmp_path):
    """Issue 32's 'done when': the optimizer, the atlas (mining and montages), the live view's
    network pass and the harness on a layer in the middle of each family (in-process, the work
    each command does; tests/test_backbones.py::test_every_command_on_a_timm_vit runs the commands)."""
    from PIL import Image

    from deepvis_repro.atlas.mining import mine
    from deepvis_repro.atlas.patches import render_montages
    from deepvis_repro.optimize import optimize
    from deepvis_repro.reproduce.harness import run_profile

    b = dv.load_backend("torchvision", arch=key[3:]) if key.startswith("tv:") else timm_backend(key)
    layers = [l for l in shown_layers(b) if l != "prob"]
    mid = layers[len(layers) // 2]
    r = optimize(b, [f"{mid}:0", f"{b.output_layer}:1"], preset="paper_3", steps=2, progress=False)
    assert r.images.shape == (2, *b.input_size, 3) and np.isfinite(r.best_activation).all()
    paths = []
    for name in ("chelsea", "coffee"):
        paths.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(photos[name]).save(paths[-1])
    m = mine(b, paths, [mid], top_k=1, progress=False, atlas_dir=tmp_path / "A")
    assert m.values[mid].shape[0] == layer_shapes(b, [mid])[mid][0]
    assert render_montages(b, tmp_path / "A", units=[0, 1], progress=False, tile=64) == {mid: 2}
    snap = _live_pass(b, mid, photos["coffee"], back=1)
    assert not snap.warning and snap.back_image is not None and snap.n_channels == m.values[mid].shape[0]
    run = run_profile(b, {"name": "t", "settings": ["paper_3"], "classes": [1], "hidden": [[0.5, 0]], "steps": 2},
                      progress=False, numerics="default")
    assert len(run.records) == 2 and all(np.isfinite(rec["activation"]) for rec in run.records)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18", "convnext_atto"])
def test_timm_pictures_reach_the_model_as_timms_own_eval_pipeline_feeds_it(name, photos):
    """Issue 32: crop_pct and interpolation from the model's pretrained_cfg (0.9 bicubic for a
    ViT, 0.95 for timm's ResNet-18, 0.875 ConvNeXt): the model's input equals timm's own
    create_transform on the same photo, to float rounding, for a wide, a tall-cropped and a square one."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    b = dv.load_backend("timm", model=name)
    pipeline = create_transform(**resolve_data_config({}, model=b.module))
    assert (b.crop_pct, b.interpolation) == (b.module.pretrained_cfg["crop_pct"], "bicubic")
    for img in (photos["chelsea"], photos["astronaut"], photos["coffee"][:, :300]):
        theirs = pipeline(Image.fromarray(img))[None]
        assert torch.allclose(b._to_input(b.preprocess(img)), theirs, atol=1e-5)
    assert b.view_spec()["crop_pct"] == b.crop_pct  # the atlas's identity holds the view


def test_prefix_tokens_are_mined_beside_the_patch_grid(tmp_path, photos):
    """Issue 32: the atlas's top-k over patch positions and prefix tokens. A DeiT's class and
    distillation tokens are row 14 of blocks.1's 14x14 map (position (14, p) is token p): each
    unit's top value is the largest over its patches and its prefix tokens, as the model computes
    them, and a unit whose best is a prefix token gets that token's own backward pass."""
    from PIL import Image

    from deepvis_repro.atlas.mining import mine
    from deepvis_repro.atlas.patches import render_montages, shared_backprop
    from deepvis_repro.atlas.store import AtlasStore

    b = timm_backend("deit_tiny_distilled_patch16_224")
    with torch.no_grad():  # random weights: a class token that stands out in every other channel
        b.module.cls_token[..., ::2] += 20.0
    names = ("chelsea", "coffee", "astronaut")
    paths = []
    for name in names:
        paths.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(photos[name]).save(paths[-1])
    r = mine(b, paths, ["blocks.1"], top_k=2, progress=False, atlas_dir=tmp_path / "A")
    st = AtlasStore(tmp_path / "A")
    assert st.manifest()["layers"]["blocks.1"]["prefix"] == ["cls", "dist"]
    views = {i: b.view(photos[n]) for i, n in enumerate(names)}
    with torch.no_grad():
        acts = {i: b.forward(b.views_to_x(torch.from_numpy(v[None])), ["blocks.1", "blocks.1" + PREFIX])
                for i, v in views.items()}
    pos, ids, vals = r.positions["blocks.1"], r.image_ids["blocks.1"], r.values["blocks.1"]
    on_prefix = [c for c in range(192) if pos[c, 0, 0] == 14]
    assert on_prefix and len(on_prefix) < 192  # some units' best is a prefix token, most a patch's
    for c in range(192):
        i, (y, x) = int(ids[c, 0]), pos[c, 0]
        grid, pre = acts[i]["blocks.1"][0, c], acts[i]["blocks.1" + PREFIX][0, c]
        want = max(float(grid.max()), float(pre.max()))
        got = float(pre[x]) if y == 14 else float(grid[y, x])
        assert got == pytest.approx(want, rel=1e-5) and vals[c, 0] == pytest.approx(want, rel=1e-5), c
    # the montage's deconv of a prefix-token unit is that token's own gradient
    c = on_prefix[0]
    i, (y, x) = int(ids[c, 0]), pos[c, 0]
    got = {}
    shared_backprop(b, {i: views[i]}, [(i, c, (int(y), int(x)))], "blocks.1", lambda k, g: got.update(g=g),
                    mode="gradient")
    xin = b.views_to_x(torch.from_numpy(views[i][None])).requires_grad_(True)
    b.forward(xin, ["blocks.1" + PREFIX])["blocks.1" + PREFIX][0, c, x].backward()
    assert np.allclose(got["g"], xin.grad[0].permute(1, 2, 0).numpy(), atol=1e-6)
    assert render_montages(b, tmp_path / "A", units=[c], progress=False, tile=64) == {"blocks.1": 1}


def test_the_search_runs_on_a_timm_vit_with_token_units(tmp_path, photos):
    """Issue 32: deepvis-search backend=timm ... with units that exist on that model, a class
    token's unit among them (its scoring panel reads the prefix tokens)."""
    pytest.importorskip("ray.tune")
    from PIL import Image

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(photos[name]).save(corpus / f"{name}.png")
    out = tmp_path / "s"
    r = run("deepvis-search", "backend=timm", "backend.model=vit_tiny_patch16_224", "backend.model_args={depth:2}",
            "search.trials=2", "search.steps=4", "search.report_every=2", "search.asha=null", "search.validate=false",
            "search.units=[head:1,blocks.1:3,blocks.1:3:cls]", f"search.corpus={corpus}", f"search.dir={out}",
            f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and [u["unit"] for u in rows[0]["units"]] == ["head:1", "blocks.1:3:7:7", "blocks.1:3:cls"]
    assert (out / "best_1.yaml").exists()
