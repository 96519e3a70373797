import os

import pytest
import skimage.data

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")


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
