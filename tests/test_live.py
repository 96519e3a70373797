"""The live view: sources on real data, tiling, back modes on a hand-computed case, and the
headless scripted mode end to end."""
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deepvis_repro.backend import HookBackend
from deepvis_repro.errors import DeepvisError
from deepvis_repro.backprop import backprop
from deepvis_repro.live.sources import ImageFolderSource, ImageSource, VideoSource, WebcamSource
from deepvis_repro.live.tiles import grid_shape, tile_layer

ENV = dict(os.environ, SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("images")
    for name, img in photos.items():
        Image.fromarray(img).save(d / f"{name}.png")
    (d / "b_broken.jpg").write_bytes(b"this is not a jpeg")
    (d / "notes.txt").write_text("not an image, not listed")
    return d


@pytest.fixture(scope="module")
def video_file(tmp_path_factory, photos):
    """A short real H.264 video: the camera pans across the astronaut photo."""
    from conftest import write_video

    return write_video(tmp_path_factory.mktemp("video") / "pan.mp4", photos["astronaut"], frames=20, size=256,
                       step=10, top=100)


def test_image_folder_source_steps_and_skips_unreadable(image_dir, photos):
    src = ImageFolderSource(str(image_dir))
    assert src.files == ["astronaut.png", "b_broken.jpg", "chelsea.png", "coffee.png", "rocket.png"]
    assert np.array_equal(src.read(), photos["astronaut"])
    src.next()  # the broken file is skipped, and named
    assert np.array_equal(src.read(), photos["chelsea"])
    assert "b_broken.jpg" in src.message
    src.prev()
    assert np.array_equal(src.read(), photos["astronaut"])
    src.prev()  # wraps around
    assert np.array_equal(src.read(), photos["rocket"])


def test_single_image_source(image_dir, photos):
    assert np.array_equal(ImageSource(str(image_dir / "coffee.png")).read(), photos["coffee"])


def test_video_source_decodes_real_frames(video_file, photos):
    src = VideoSource(str(video_file))
    first = src.read().astype(int)
    assert first.shape == (256, 256, 3)
    assert np.abs(first - photos["astronaut"][100:356, 0:256]).mean() < 12  # lossy, but the same picture
    time.sleep(0.25)
    later = src.read()
    assert src.frames_read >= 2 and not np.array_equal(later, first)  # the camera panned: a new frame
    src.close()


@pytest.mark.parametrize("make, msg", [
    (lambda d: ImageFolderSource(str(d / "nope")), "image folder not found"),
    (lambda d: ImageFolderSource(str(d)), "no images in folder"),
    (lambda d: VideoSource(str(d / "bad.mp4")), "cannot decode video"),
])
def test_source_errors(tmp_path, make, msg):
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(DeepvisError, match=msg):
        make(tmp_path)


def test_missing_camera_is_a_clear_error():
    import pygame.camera

    try:
        pygame.camera.init()
        if pygame.camera.list_cameras():
            pytest.skip("this machine has a camera")
    except Exception:
        pass
    with pytest.raises(DeepvisError, match="no camera"):
        WebcamSource()


@pytest.mark.parametrize("channels, hw", [(1, (5, 5)), (3, (4, 6)), (96, (13, 13)), (1000, None), (1280, (7, 7))])
def test_tiling_any_channel_count(channels, hw):
    rng = np.random.default_rng(channels)
    acts = rng.normal(size=(channels, *hw)) if hw else rng.normal(size=channels)
    grid, (rows, cols), (th, tw) = tile_layer(acts)
    assert rows * cols >= channels > (rows - 1) * cols and abs(rows - cols) <= 1
    assert (rows, cols) == grid_shape(channels)
    h, w = hw or (1, 1)
    assert (th, tw) == (h, w) and grid.shape == (rows * (h + 1) + 1, cols * (w + 1) + 1)
    flat = acts.reshape(channels, h, w)
    norm = (flat - flat.min()) / (flat.max() - flat.min())
    for c in (0, channels // 2, channels - 1):  # each channel sits at its own tile
        r, q = divmod(c, cols)
        tile = grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w]
        assert np.abs(tile.astype(float) - norm[c] * 255).max() <= 1


class TinyReLUNet(nn.Module):
    """x (1 channel... 3 channels, 1x1) -> 1x1 conv (2 units) -> ReLU -> 1x1 conv (1 unit)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.c2 = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.c1.weight.copy_(torch.tensor([[1.0, 2.0, -1.0], [-1.0, 1.0, 3.0]]).view(2, 3, 1, 1))
            self.c2.weight.copy_(torch.tensor([[2.0, -3.0], [1.0, 1.0]]).view(2, 2, 1, 1))

    def forward(self, x):
        return self.c2(self.relu(self.c1(x)))


@pytest.mark.parametrize("x, channel, active", [((1.0, 1.0, 1.0), 0, (1, 1)), ((0.0, 0.0, 1.0), 1, (0, 1))])
def test_back_modes_against_hand_computation(x, channel, active):
    b = HookBackend(TinyReLUNet(), [("h", "relu"), ("out", "c2")], to_input=lambda t: t,
                    mean=[0.0, 0.0, 0.0], input_size=(1, 1), prob=False)
    xin = torch.tensor(x).view(1, 3, 1, 1)
    W1 = np.array([[1.0, 2.0, -1.0], [-1.0, 1.0, 3.0]])
    W2 = np.array([[2.0, -3.0], [1.0, 1.0]])
    pre = W1 @ np.array(x)
    mask = (pre > 0).astype(float)
    np.testing.assert_array_equal(mask, active)
    out = W2 @ (pre * mask)
    seed = np.zeros(2)
    seed[channel] = out[channel]               # the channel's own activation, others zero
    up = W2.T @ seed                            # gradient arriving at the ReLU's output
    want = {
        "gradient": W1.T @ (up * mask),
        "deconv": W1.T @ np.maximum(up, 0),     # ignores the forward mask
        "guided": W1.T @ (np.maximum(up, 0) * mask),
    }
    got = {m: backprop(b, xin, "out", channel, m)[0].flatten().numpy() for m in want}
    for m in want:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-6, err_msg=m)
    # the case was chosen so that the modes actually disagree
    assert len({tuple(np.round(v, 5)) for v in want.values()}) >= 2


class TinyReLU6Net(nn.Module):
    """3 inputs (1x1) -> 1x1 conv (4 units) -> ReLU6 -> 1x1 conv (2 units)."""

    def __init__(self, inplace):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1, bias=False)
        self.act = nn.ReLU6(inplace=inplace)
        self.c2 = nn.Conv2d(4, 2, 1, bias=False)
        with torch.no_grad():
            self.c1.weight.copy_(torch.tensor([[4.0, 2, 1], [1, 1, 0], [1, 1, 1], [-2, -1, -1]]).view(4, 3, 1, 1))
            self.c2.weight.copy_(torch.tensor([[1.0, 1, -1, 1], [0, 1, 1, 1]]).view(2, 4, 1, 1))

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


@pytest.mark.parametrize("inplace", [False, True])
def test_back_modes_through_relu6_against_hand_computation(inplace):
    """ReLU6 (EfficientNet's): a unit above 6 is masked like one below 0 in the gradient and in
    guided backprop; deconv ignores both. The four hidden units are saturated, active with a
    positive gradient, active with a negative one, and off with a positive one, so that the three
    modes give three different answers. The layer hooked at the ReLU6 still reports its values,
    and the module computes its plain forward again after the back pass."""
    net = TinyReLU6Net(inplace)
    b = HookBackend(net, [("h", "act"), ("out", "c2")], to_input=lambda t: t,
                    mean=[0.0, 0.0, 0.0], input_size=(1, 1), prob=False)
    W1 = net.c1.weight.detach().view(4, 3).numpy().astype(float)
    W2 = net.c2.weight.detach().view(2, 4).numpy().astype(float)
    pre = W1 @ np.ones(3)
    np.testing.assert_array_equal(pre, [7, 2, 3, -4])
    mask = ((pre > 0) & (pre < 6)).astype(float)
    h = np.clip(pre, 0, 6)
    up = W2.T @ np.array([W2[0] @ h, 0.0])      # channel 0 seeded with its own activation (5)
    np.testing.assert_array_equal(up, [5, 5, -5, 5])
    want = {"gradient": W1.T @ (up * mask), "deconv": W1.T @ np.maximum(up, 0),
            "guided": W1.T @ (np.maximum(up, 0) * mask)}
    assert len({tuple(v) for v in want.values()}) == 3
    x = torch.ones(1, 3, 1, 1)
    for m in want:
        gx, _, acts = backprop(b, x, "out", 0, m, also="h")
        np.testing.assert_allclose(gx.flatten().numpy(), want[m], rtol=1e-6, err_msg=m)
        np.testing.assert_array_equal(acts["h"].flatten().numpy(), h)  # the hook at the ReLU6 itself
        np.testing.assert_array_equal(acts["out"].flatten().numpy(), W2 @ h)
    assert "forward" not in vars(net.act)  # the back mode's forward is gone with its block
    plain = torch.autograd.functional.jacobian(lambda t: net(t)[0, 0, 0, 0], x).flatten()  # afterwards
    np.testing.assert_allclose(plain.numpy(), W1.T @ (W2[0] * mask), rtol=1e-6)


def run_live(*args, timeout=240):
    return subprocess.run(["deepvis-live", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_headless_keys_screenshot_and_stats(image_dir, tmp_path):
    shot, stats = tmp_path / "shot.png", tmp_path / "stats.json"
    r = run_live("source=images", f"source.path={image_dir}", "live.max_frames=30",
                 "live.keys=[o,o,o,l,L,b,b,e,e]", f"live.screenshot={shot}", f"live.stats={stats}")
    assert r.returncode == 0, r.stderr
    s = json.loads(stats.read_text())
    assert s["frames"] >= 30 and s["net_passes"] >= 1 and s["net_fps"] > 0 and s["display_fps"] > 0
    # one definition of network speed (the status line's too): passes per second of network time
    assert s["net_fps"] == pytest.approx(1000 / s["net_ms_per_pass"])
    assert s["net_passes_per_s"] <= s["net_fps"]
    assert s["layer"] == "blocks.2" and s["unit"] == 4 and s["back_mode"] == "deconv"
    assert s["source"].startswith("coffee.png")  # e twice: astronaut -> (broken skipped) chelsea -> coffee
    assert "b_broken.jpg" in s["message"]
    # the console says what happened and where the files went (it used to print nothing)
    assert f"screenshot: {shot}" in r.stdout and f"stats: {stats}" in r.stdout and "frames, network" in r.stdout
    assert s["display_fps"] <= 30 * 1.05  # live.fps caps the display
    img = np.asarray(Image.open(shot))
    assert img.shape == (720, 1280, 3)
    # the input pane shows the coffee photo: mostly warm colours, not the dark background
    pane = img[8:308, 8:308].astype(int)
    assert pane.std() > 20 and pane[..., 0].mean() > pane[..., 2].mean()


def test_a_wide_input_keeps_its_aspect_ratio_in_the_panes(image_dir, tmp_path):
    """A 112x224 network input is shown 300x150 in the input and back panes, centred on the pane's
    background, not stretched into a square (issue: 48x192 OCR inputs were squashed)."""
    shot = tmp_path / "shot.png"
    r = run_live("source=images", f"source.path={image_dir}", "backend.input_size=[112,224]", "live.max_frames=25",
                 "live.keys=[b]", f"live.screenshot={shot}")
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(shot)).astype(int)
    for top in (8, 8 + 300 + 8):  # the input pane, then the back pane under it
        pane = img[top:top + 300, 8:308]
        band, picture = pane[20:70], pane[80:220]  # above the picture (rows 0-74 empty) / inside it
        assert np.abs(band - np.array([40, 40, 46])).max() <= 2, top  # the pane's own background
        assert picture.std() > 10, top


def test_headless_video_source(video_file, tmp_path):
    stats = tmp_path / "stats.json"
    r = run_live("source=video", f"source.path={video_file}", "live.max_frames=40",
                 "live.keys=[u,b]", f"live.stats={stats}", "live.layer=fc")
    assert r.returncode == 0, r.stderr
    s = json.loads(stats.read_text())
    assert s["layer"] == "pool" and s["back_mode"] == "gradient" and s["net_passes"] >= 2


@pytest.mark.parametrize("args, msg", [
    (["source=images", "source.path=/no/such/dir"], "image folder not found: /no/such/dir"),
    (["source=video", "source.path=/no/such.mp4"], "video file not found"),
    (["source=images"], "missing source.path: give source.path=PATH"),
    (["source=radio"], "unknown source 'radio'"),
    (["source=webcam"], "no camera found"),
])
def test_live_user_errors(args, msg):
    r = run_live(*args, "live.max_frames=3", timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed")
def test_real_window_under_xvfb(image_dir, tmp_path):
    display = ":97"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "1400x900x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20  # wait for the server's socket, not a fixed delay
        while not os.path.exists("/tmp/.X11-unix/X97") and time.time() < deadline:
            time.sleep(0.1)
        env = {k: v for k, v in ENV.items() if k != "SDL_VIDEODRIVER"}
        env["DISPLAY"] = display
        shot = tmp_path / "x11.png"
        r = subprocess.run(["deepvis-live", "source=images", f"source.path={image_dir}",
                            "live.max_frames=20", "live.keys=[o,h]", f"live.screenshot={shot}"],
                           capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, r.stderr
        img = np.asarray(Image.open(shot))
        assert img.shape == (720, 1280, 3)
        # the help overlay is up: a dark box over the middle with bright text in it
        box = img[70:400, 360:920].astype(int)
        assert box.mean() < 90 and box.max() > 200
    finally:
        xvfb.terminate()
        xvfb.wait(timeout=10)


def test_every_key_of_the_table_acts_and_is_in_the_help(lite0, image_dir):
    """The key table (live/keys.py) is the one place: each binding's keys reach the method it names
    and change what its help line says; keys outside it are refused in live.keys."""
    from deepvis_repro.live.app import LiveApp
    from deepvis_repro.live.keys import BINDINGS, HELP

    app = LiveApp(lite0, ImageFolderSource(str(image_dir)), layer="blocks.2")
    assert [shown for shown, _ in HELP] == [b.shown for b in BINDINGS]
    s0 = app.settings
    app.handle_key("l"), app.handle_key("L"), app.handle_key("shift+right")
    assert app.settings.unit == s0.unit + 7  # 1 + 3 + 3
    app.handle_key("k")  # a row down: as many units as the grid has columns
    assert app.settings.unit == s0.unit + 7 + grid_shape(app.n_channels(app.settings.layer))[1]
    app.handle_key("o")
    assert app.backend.layers[app.settings.layer] == "blocks.3"
    for key, field in (("b", "back"), ("n", "back_norm"), ("a", "back_diffs"), ("z", "zoom"), ("t", "boost"),
                       ("T", "gamma"), ("0", "crop"), ("d", "frozen"), ("x", "attention")):
        before = getattr(app.settings, field)
        app.handle_key(key)
        assert getattr(app.settings, field) != before, key
    app.handle_key("s")  # no atlas: says so instead
    assert "needs an atlas" in app.message and not app.settings.pattern
    app.handle_key("h")
    assert app.show_help
    app.handle_key("escape")
    assert not app.running
    acted = {b.action for b in BINDINGS}
    assert all(callable(getattr(app, f"key_{a}", None)) for a in acted)
    with pytest.raises(DeepvisError, match=r"unknown key.s. in live.keys: y, shift\+y; valid: i, k"):
        LiveApp(lite0, ImageFolderSource(str(image_dir)), keys=["o", "y", "shift+y", "shift+up"])
