import os
import shutil
import tempfile

import pytest
import skimage.data

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

# The tests never write the user's real ~/.cache (Caffe weights, the demo corpus): every cache of
# this session, in-process and in the commands it starts, goes to a folder of its own. Set at
# import, before any test or fixture reads it.
_CACHE = tempfile.mkdtemp(prefix="deepvis-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE


# Commands started without a run folder write outputs/ into the working folder: the session's
# own, not the repository (the tests name every path they read; none is relative).
_CWD = tempfile.mkdtemp(prefix="deepvis-test-cwd-")


@pytest.fixture(scope="session", autouse=True)
def _session_folder():
    before = os.getcwd()
    os.chdir(_CWD)
    yield
    os.chdir(before)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)
    shutil.rmtree(_CWD, ignore_errors=True)


@pytest.fixture(scope="session")
def lite0():
    import deepvis_repro as dv

    return dv.load_backend()


@pytest.fixture(scope="session")
def photos():
    """Real photos from scikit-image's sample data."""
    return {n: getattr(skimage.data, n)() for n in ("chelsea", "coffee", "astronaut", "rocket")}


def top_labels(backend, image, k=5):
    import torch

    with torch.no_grad():
        p = backend.forward(backend.preprocess(image), ["prob"])["prob"][0]
    return [backend.labels[i] for i in p.topk(k).indices.tolist()]


def write_video(path, image, frames: int, size: int, step: int, rate: int = 10, top: int = 0):
    """A real H.264 clip: the camera pans step pixels a frame across image (rows top..top+size)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = size, size, "yuv420p"
        for k in range(frames):
            crop = np.ascontiguousarray(image[top:top + size, step * k:step * k + size])
            for p in s.encode(av.VideoFrame.from_ndarray(crop, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path
