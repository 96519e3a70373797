import os
import shutil
import tempfile

# The suite runs in pytest-xdist workers (pyproject's addopts: -n auto). Each worker gets its
# share of the cores as threads, for its own torch and for the commands it starts (they inherit
# the environment). Measured on the reference machine (2 cores): one process 945 s; two workers
# at two threads each (oversubscribed) 811 s; two at one thread each 536 s. Set before torch loads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _THREADS

import pytest  # noqa: E402
import skimage.data  # noqa: E402

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

# The tests never write the user's real ~/.cache (Caffe weights, the demo corpus): every cache of
# this session, in-process and in the commands it starts, goes to a folder of its own. Set at
# import, before any test or fixture reads it.
_CACHE = tempfile.mkdtemp(prefix="deepvis-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
# The bf16 tests judge bfloat16 arithmetic, which a CPU without native bfloat16 would otherwise
# replace by float32 (bf16.runs_bf16); tests/test_bf16.py checks that fallback without this.
os.environ["DEEPVIS_BF16_EMULATE"] = "1"


# Commands started without a run folder write outputs/ into the working folder: the session's
# own, not the repository (the tests name every path they read; none is relative).
_CWD = tempfile.mkdtemp(prefix="deepvis-test-cwd-")


@pytest.fixture(scope="session", autouse=True)
def _session_folder():
    before = os.getcwd()
    os.chdir(_CWD)
    yield
    os.chdir(before)


#: More workers than this add memory (a model, sometimes a Ray cluster, each) faster than speed:
#: the suite's longest test (the quick run, about 3 minutes on one core) bounds it anyway.
MAX_WORKERS = 4


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; the suite also runs without it (-p no:xdist -o addopts=)
def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """The README's first command (the quick run, the suite's longest test by far) first: the
    other worker(s) run everything else meanwhile, instead of waiting for it at the end."""
    items.sort(key=lambda item: "quick_run" not in getattr(item, "fixturenames", ()))


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


@pytest.fixture(scope="module")
def ray_session(request):
    """A local Ray for one test module; the module's own objectives travel to the workers by
    value (tests/ is not importable there)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune")
    ray.cloudpickle.register_pickle_by_value(request.module)
    ray.init(num_cpus=2, object_store_memory=100_000_000, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()
