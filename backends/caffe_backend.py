"""The `caffe` and `caffenet` backends: any Caffe model (deploy prototxt + caffemodel), or the
paper's CaffeNet with its prototxt shipped here, seen with Caffe's own blob names and values.

The converted weights are cached (keyed by a hash of prototxt and caffemodel) as a tensor file,
so a second load skips parsing the caffemodel.
"""
from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from deepvis_repro.backend import HookBackend
from deepvis_repro.errors import DeepvisError
from deepvis_repro.labels import imagenet_labels, read_labels

from .caffe_net import CaffeNet, blob_array, input_shape, read_caffemodel, read_prototxt, trained_blobs
from . import caffe_proto

IMAGENET_MEAN_BGR = (104.0, 117.0, 123.0)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepvis-repro" / "caffe"


def _file_hash(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def load_weights(prototxt: str, weights: str, cache_dir) -> dict[str, list[np.ndarray]]:
    """Trained blobs per layer: from the cache when prototxt + caffemodel were seen before."""
    if not os.path.isfile(weights):
        raise DeepvisError(f"caffemodel not found: {weights}")
    cache = None
    if cache_dir not in (None, "", False):
        cache = Path(cache_dir) / f"{_file_hash(prototxt, weights)}.pt"
        if cache.is_file():
            try:
                flat = torch.load(cache, map_location="cpu", weights_only=True)
                out: dict[str, list] = {}
                for key in sorted(flat, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
                    out.setdefault(key.rsplit("/", 1)[0], []).append(flat[key].numpy())
                return out
            except Exception:  # a damaged cache entry is rebuilt, never trusted
                cache.unlink(missing_ok=True)
    blobs = trained_blobs(read_caffemodel(weights))
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            flat = {f"{name}/{i}": torch.from_numpy(np.ascontiguousarray(b)) for name, bs in blobs.items()
                    for i, b in enumerate(bs)}
            tmp = cache.with_suffix(".tmp")
            torch.save(flat, tmp)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home: no cache, same result
    return blobs


def load_mean(mean, size: tuple[int, int]) -> torch.Tensor:
    """RGB mean on a 0..255 scale, (3,1,1) or (3,H,W), from Caffe's BGR convention: a list of
    three per-channel values, or a mean file (.npy, 3xHxW, or .binaryproto) centre-cropped."""
    if isinstance(mean, (list, tuple)) and len(mean) == 3:
        return torch.tensor([float(mean[2]), float(mean[1]), float(mean[0])]).view(3, 1, 1)
    if not isinstance(mean, (str, os.PathLike)):
        raise DeepvisError(f"mean must be three BGR values or a mean file path, got {mean!r}")
    path = os.fspath(mean)
    if not os.path.isfile(path):
        raise DeepvisError(f"mean file not found: {path}")
    try:
        if path.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            blob = caffe_proto.BlobProto()
            with open(path, "rb") as f:
                blob.ParseFromString(f.read())
            arr = blob_array(blob)
    except Exception as e:
        raise DeepvisError(f"cannot read mean file {path}: {e}") from None
    arr = np.asarray(arr, dtype=np.float32).reshape(-1, *np.asarray(arr).shape[-2:])
    if arr.shape[0] != 3:
        raise DeepvisError(f"mean file {path} has shape {arr.shape}; expected 3xHxW (BGR)")
    h, w = size
    H, W = arr.shape[1:]
    if H < h or W < w:
        raise DeepvisError(f"mean file {path} is {H}x{W}, smaller than the input {h}x{w}")
    top, left = (H - h) // 2, (W - w) // 2
    return torch.from_numpy(np.ascontiguousarray(arr[::-1, top:top + h, left:left + w]))


class CaffeBackend(HookBackend):
    """Layers are Caffe's blob names (conv1 after relu1 is the rectified value, as in Caffe)."""

    def __init__(self, prototxt: str, weights: str, mean=IMAGENET_MEAN_BGR, labels=None,
                 input_size=None, crop: bool = True, input_scale: float = 1.0, lr_scale: float = 1.0,
                 progress_scale: float = 1.0, cache_dir=None, device: str = "cpu", name: str = "caffe"):
        prototxt, weights = os.fspath(prototxt), os.fspath(weights)
        net = read_prototxt(prototxt)
        size = tuple(input_size) if input_size else input_shape(net)
        if size is None:
            raise DeepvisError(f"prototxt {prototxt} declares no input size; give backend.input_size=[H,W]")
        cache = default_cache_dir() if cache_dir is None else cache_dir
        blobs = load_weights(prototxt, weights, cache)
        model = CaffeNet(net, blobs)
        writers = [(b, m) for b, m in model.blob_writers() if b != model.input_blob]
        if labels == "imagenet":
            labels = imagenet_labels()
        elif labels:
            labels = read_labels(labels)
        has_prob = any(b == "prob" for b, _ in writers)
        flip = torch.tensor([2, 1, 0])
        scale = float(input_scale)
        super().__init__(
            model, writers,
            # Caffe nets take BGR: the contract's RGB x is swapped here, and scaled as the net's
            # transform_param did (1 for CaffeNet: raw 0..255 pixels).
            to_input=lambda x: x.index_select(1, flip.to(x.device)) * scale,
            mean=load_mean(mean, size), input_size=size, labels=labels,
            prob=not has_prob and labels is not None, crop=crop, lr_scale=lr_scale,
            progress_scale=progress_scale, name=name, device=device)


def caffenet_prototxt() -> str:
    return str(resources.files("deepvis_repro_backends").joinpath("data/caffenet_deploy.prototxt"))


class CaffeNetBackend(CaffeBackend):
    """The paper's CaffeNet: the user supplies only the caffemodel (and, if they have it,
    ilsvrc_2012_mean.npy; else Caffe's per-channel BGR mean 104/117/123)."""

    def __init__(self, weights: str, mean=None, labels="imagenet", **kw):
        super().__init__(caffenet_prototxt(), weights, mean=IMAGENET_MEAN_BGR if mean is None else mean,
                         labels=labels, input_size=(227, 227), name="caffenet", **kw)
