"""deepvis-inspect end to end, as a user runs it."""
import subprocess

import pytest
from PIL import Image


def run(*args):
    return subprocess.run(["deepvis-inspect", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("photos")
    for name, img in photos.items():
        Image.fromarray(img).save(d / f"{name}.jpg")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def test_names_what_is_in_a_photo(photo_files):
    r = run(f"image={photo_files / 'coffee.jpg'}", "top_k=3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].endswith("espresso")
    probs = [float(l.split()[0]) for l in lines]
    assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1


def test_layer_table():
    r = run()
    assert r.returncode == 0, r.stderr
    assert "blocks.15" in r.stdout and "(1280, 7, 7)" in r.stdout and "prob" in r.stdout


def test_torchvision_alexnet_table_shows_caffe_names():
    r = run("backend=torchvision", "backend.arch=alexnet")
    assert r.returncode == 0, r.stderr
    assert "features.1 (conv1)" in r.stdout and "(64, 55, 55)" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["backend=nosuch"], "unknown backend 'nosuch'; valid: caffe, caffenet, efficientnet_lite0, efficientnet_lite1, onnx, timm, torchvision"),
    (["image=/no/such.png"], "image not found: /no/such.png"),
    (["backend.weights=/no/such.pth"], "weights file not found: /no/such.pth"),
    (["backend=torchvision", "backend.arch=resnet51"], "unknown torchvision arch 'resnet51'"),
])
def test_user_errors_are_one_line(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unreadable_image(photo_files):
    r = run(f"image={photo_files / 'broken.jpg'}")
    assert r.returncode == 2 and "cannot read image" in r.stderr and "broken.jpg" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
