"""The `caffe` and `caffenet` backends: any Caffe model (deploy prototxt + caffemodel), or the
paper's CaffeNet with its prototxt shipped here, seen with Caffe's own blob names and values.

The converted weights are cached (keyed by a hash of prototxt and caffemodel) as a tensor file,
so a second load skips parsing the caffemodel.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from deepvis_repro.backend import HookBackend, check_input_size
from deepvis_repro.errors import DeepvisError
from deepvis_repro.files import atomic_write, file_sha256, tensors_sha256, write_text
from deepvis_repro.images import LUMA
from deepvis_repro.labels import check_label_count, imagenet_labels, read_labels

from . import caffe_proto
from .caffe_net import CaffeNet, blob_array, input_channels, input_shape, read_caffemodel, read_prototxt, trained_blobs


IMAGENET_MEAN_BGR = (104.0, 117.0, 123.0)
#: Largest input side accepted from a prototxt: far above any Caffe model's, far below what would
#: exhaust memory before the first layer runs.
MAX_SIDE = 4096


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepvis-repro" / "caffe"


def cache_key(prototxt: str, weights: str) -> str:
    """A hash of both files' hashes, each length-prefixed: no two different pairs share a key."""
    a, b = file_sha256(prototxt), file_sha256(weights)
    return hashlib.sha256(f"{len(a)}:{a}{len(b)}:{b}".encode()).hexdigest()[:40]


def _cache_secret(folder: Path) -> bytes:
    """This cache folder's own random key (0600), so that an entry's seal cannot be recomputed
    from the entry alone, nor carried from another cache."""
    p = folder / ".secret"
    try:
        data = p.read_bytes()
        if len(data) == 32:
            return data
    except OSError:
        pass
    data = os.urandom(32)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except FileExistsError:
        return _cache_secret(folder) if p.stat().st_size == 32 else data
    except OSError:
        pass  # an unwritable cache: nothing will be cached, nothing read back
    return data


def _seal(secret: bytes, key: str, flat: dict) -> str:
    """HMAC of the entry's key (the two source files' hashes) and its tensors: an entry edited
    and re-digested, or another model's entry copied under this key, does not match."""
    import hmac

    return hmac.new(secret, f"{key}\0{tensors_sha256(flat)}".encode(), hashlib.sha256).hexdigest()


def _read_cache(path: Path) -> dict[str, list[np.ndarray]] | None:
    """The cached blobs, or None when the entry is absent, unreadable, incomplete or altered
    (its seal does not match this key, these tensors and this cache's secret): such an entry is
    rebuilt."""
    import hmac

    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        flat, seal = entry["blobs"], entry["seal"]
        key = path.stem
        if not isinstance(flat, dict) or entry.get("key") != key or \
                not hmac.compare_digest(_seal(_cache_secret(path.parent), key, flat), seal):
            return None
        out: dict[str, list] = {}
        for key in sorted(flat, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
            out.setdefault(key.rsplit("/", 1)[0], []).append(flat[key].numpy())
        return out
    except Exception:  # damaged, truncated, an older format: rebuilt, never trusted
        return None


def _write_cache(path: Path, blobs: dict) -> None:
    """Best effort: a read-only or full cache folder means no cache, the same result."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = {f"{name}/{i}": torch.from_numpy(np.ascontiguousarray(b)) for name, bs in blobs.items()
                for i, b in enumerate(bs)}
        seal = _seal(_cache_secret(path.parent), path.stem, flat)
        with atomic_write(path, "wb") as f:
            torch.save({"blobs": flat, "key": path.stem, "seal": seal}, f)
    except Exception:  # OSError, torch.save's RuntimeError on a full disk, DeepvisError from atomic_write
        pass


def load_weights(prototxt: str, weights: str, cache_dir, use_cache: bool = True):
    """(trained blobs per layer, came from the cache?): from the cache when this prototxt +
    caffemodel pair was seen before, else parsed from the caffemodel (and cached)."""
    if not os.path.isfile(weights):
        raise DeepvisError(f"caffemodel not found: {weights}")
    cache = None
    if cache_dir not in (None, "", False):
        cache = Path(cache_dir) / f"{cache_key(prototxt, weights)}.pt"
        blobs = _read_cache(cache) if use_cache else None
        if blobs is not None:
            return blobs, True
    blobs = trained_blobs(read_caffemodel(weights))
    if cache is not None:
        _write_cache(cache, blobs)
    return blobs, False


def load_mean(mean, size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """RGB mean on a 0..255 scale, (3,1,1) or (3,H,W), from Caffe's BGR convention: a list of
    three per-channel values, or a mean file (.npy, 3xHxW, or .binaryproto) centre-cropped.
    A grey (1-channel) net's: one value, or a 1xHxW file; None: ImageNet's (its luma for grey)."""
    if mean is None:
        mean = IMAGENET_MEAN_BGR if channels == 3 else [round(float(np.dot(IMAGENET_MEAN_BGR[::-1], LUMA)), 3)]
    if isinstance(mean, (int, float)):
        mean = [mean]
    if isinstance(mean, (list, tuple)) and channels == 1:
        if len(mean) != 1:
            raise DeepvisError(f"mean must be one value for this 1-channel (grey) net, got {list(mean)}")
        return torch.tensor([float(mean[0])]).view(1, 1, 1)
    if isinstance(mean, (list, tuple)) and len(mean) == 3:
        return torch.tensor([float(mean[2]), float(mean[1]), float(mean[0])]).view(3, 1, 1)
    if channels not in (1, 3):  # no image reaches such a net; its mean only has to fit
        return torch.zeros(channels, 1, 1)
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
    if arr.shape[0] != channels:
        raise DeepvisError(f"mean file {path} has shape {arr.shape}; expected "
                           + ("3xHxW (BGR)" if channels == 3 else f"{channels}xHxW for this {channels}-channel net"))
    h, w = size
    H, W = arr.shape[1:]
    if H < h or W < w:
        raise DeepvisError(f"mean file {path} is {H}x{W}, smaller than the input {h}x{w}")
    top, left = (H - h) // 2, (W - w) // 2
    return torch.from_numpy(np.ascontiguousarray(arr[::-1, top:top + h, left:left + w]))


class CaffeBackend(HookBackend):
    """Layers are Caffe's blob names (conv1 after relu1 is the rectified value, as in Caffe)."""

    def __init__(self, prototxt: str, weights: str, mean=None, labels=None,
                 input_size=None, crop: bool = True, input_scale: float = 1.0, lr_scale: float = 1.0,
                 progress_scale: float = 1.0, cache_dir=None, device: str = "cpu", name: str = "caffe",
                 resize=None, until: str | None = None):
        prototxt, weights = os.fspath(prototxt), os.fspath(weights)
        self.prototxt, self.weights = prototxt, weights
        self.input_scale = float(input_scale)
        net = read_prototxt(prototxt)
        size = check_input_size(input_size, f"prototxt {prototxt}") if input_size else input_shape(net)
        if size is None:
            raise DeepvisError(f"prototxt {prototxt} declares no input size; give backend.input_size=[H,W]")
        if not (1 <= size[0] <= MAX_SIDE and 1 <= size[1] <= MAX_SIDE):
            raise DeepvisError(f"input size {size[0]}x{size[1]} (prototxt {prototxt}) is not in 1..{MAX_SIDE} "
                               "pixels per side; give backend.input_size=[H,W]")
        channels = input_channels(net)
        cache = default_cache_dir() if cache_dir is None else cache_dir
        blobs, cached = load_weights(prototxt, weights, cache)
        until = None if until in (None, "") else str(until)
        try:
            model = CaffeNet(net, blobs, size, until=until, channels=channels)
        except DeepvisError:
            if not cached:
                raise
            # the cache entry does not fit (it should not happen): rebuild it from the caffemodel,
            # so that any error names the caffemodel only when the caffemodel is at fault
            blobs, _ = load_weights(prototxt, weights, cache, use_cache=False)
            model = CaffeNet(net, blobs, size, until=until, channels=channels)
        if model.cut:  # the head is gone: the kept blob's channels are not classes
            labels = None
        # (CaffeNet ran each layer as it built it: a mismatch named its layer, here rather than
        # mid-run; the shapes also serve the ONNX writer)
        self.blob_shapes = model.shapes
        writers = [(b, m) for b, m in model.blob_writers() if b != model.input_blob]
        labels_arg = labels
        if labels == "imagenet":
            labels = imagenet_labels()
        elif labels:
            labels = read_labels(labels)
        has_prob = any(b == "prob" for b, _ in writers)
        self.channel_order = "BGR"
        flip = torch.tensor([2, 1, 0])
        scale = float(input_scale)

        def to_input(x):
            # Caffe nets take BGR: the contract's RGB x is swapped here (a grey net's one channel
            # as it is), and scaled as the net's transform_param did (1 for CaffeNet: 0..255 pixels).
            return (x.index_select(1, flip.to(x.device)) if x.shape[1] == 3 else x) * scale

        super().__init__(
            model, writers, to_input=to_input,
            mean=load_mean(mean, size, channels), input_size=size, labels=labels,
            prob=not has_prob and labels is not None, crop=crop, lr_scale=lr_scale,
            progress_scale=progress_scale, name=name, device=device, resize=resize, channels=channels)
        check_label_count(self, labels_arg)


def _via_onnx(prototxt: str, weights: str, kw: dict, direct_cls, direct_kw: dict):
    """The Caffe model through the ONNX route: converted once (cached beside the weights cache,
    keyed by both files and the options that change the file), loaded by the onnx backend."""
    import tempfile

    # onnx and onnx2torch: only this route loads them (the direct route reads Caffe's files alone)
    from .caffe_onnx import convert_caffe, write_onnx
    from .onnx_backend import OnnxBackend  # (as above)

    cache_dir = kw.get("cache_dir")
    cache = default_cache_dir() if cache_dir is None else cache_dir
    for f, what in ((prototxt, "prototxt"), (weights, "caffemodel")):
        if not os.path.isfile(f):
            raise DeepvisError(f"{what} not found: {f}")
    ident = {k: kw.get(k) for k in ("mean", "input_size", "input_scale", "resize", "until")}
    key = hashlib.sha256((cache_key(prototxt, weights) + json.dumps(ident, sort_keys=True, default=str))
                         .encode()).hexdigest()[:40]
    folder = Path(cache) if cache not in ("", False) else None
    path = folder / f"{key}.onnx" if folder is not None else None
    if path is not None and _sealed_file_ok(path, key):
        return _onnx_backend(OnnxBackend, path, kw)
    direct = direct_cls(**direct_kw)
    model = convert_caffe(direct, direct.prototxt, direct.weights)
    if path is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_onnx(model, str(path))
            _seal_file(path, key)
            return _onnx_backend(OnnxBackend, path, kw)
        except (DeepvisError, OSError):
            pass  # an unwritable or full cache: a private temporary copy, the same result
    tmp = Path(tempfile.mkdtemp(prefix="deepvis-onnx-"))
    try:
        write_onnx(model, str(tmp / f"{key}.onnx"))
        return _onnx_backend(OnnxBackend, tmp / f"{key}.onnx", kw)  # read whole: the copy can go
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _onnx_backend(cls, path: Path, kw: dict):
    return cls(str(path), labels=kw.get("labels"), crop=kw.get("crop", True), lr_scale=kw.get("lr_scale", 1.0),
               progress_scale=kw.get("progress_scale", 1.0), device=kw.get("device", "cpu"),
               name=f"{kw.get('name', 'caffe')}:onnx", until=kw.get("until"))


def _file_seal(path: Path, key: str) -> str:
    import hmac

    return hmac.new(_cache_secret(path.parent), f"{key}\0{file_sha256(path)}".encode(), hashlib.sha256).hexdigest()


def _seal_file(path: Path, key: str) -> None:
    write_text(path.with_suffix(".seal"), _file_seal(path, key))


def _sealed_file_ok(path: Path, key: str) -> bool:
    """The cached file is whole and the one this cache wrote for this key (an edited, truncated
    or transplanted file is rebuilt, like the weights cache's entries)."""
    import hmac

    try:
        return path.is_file() and hmac.compare_digest(path.with_suffix(".seal").read_text().strip(),
                                                      _file_seal(path, key))
    except (OSError, ValueError):
        return False


def make_caffe_backend(prototxt: str, weights: str, via: str = "direct", **kw):
    """backend=caffe: the direct route (default), or via=onnx."""
    if via == "direct":
        return CaffeBackend(prototxt, weights, **kw)
    if via != "onnx":
        raise DeepvisError(f"via must be direct or onnx, got '{via}'")
    return _via_onnx(os.fspath(prototxt), os.fspath(weights), kw, CaffeBackend,
                     dict(prototxt=prototxt, weights=weights, **kw))


def make_caffenet_backend(weights: str, via: str = "direct", **kw):
    """backend=caffenet: the direct route (default), or via=onnx."""
    if via == "direct":
        return CaffeNetBackend(weights, **kw)
    if via != "onnx":
        raise DeepvisError(f"via must be direct or onnx, got '{via}'")
    kw = {**CAFFENET_DEFAULTS, **kw}
    return _via_onnx(caffenet_prototxt(), os.fspath(weights), {**kw, "name": "caffenet"}, CaffeNetBackend,
                     dict(weights=weights, **kw))


#: CaffeNet's view, whichever route loads it (direct or via ONNX): ImageNet's labels, and images
#: stretched to 256x256 before the centre crop to 227, as Caffe trained it
CAFFENET_DEFAULTS = {"labels": "imagenet", "resize": (256, 256)}


def caffenet_prototxt() -> str:
    return str(resources.files("deepvis_repro_backends").joinpath("data/caffenet_deploy.prototxt"))


class CaffeNetBackend(CaffeBackend):
    """The paper's CaffeNet: the user supplies only the caffemodel (and, if they have it,
    ilsvrc_2012_mean.npy; else Caffe's per-channel BGR mean 104/117/123). Images are stretched to
    256x256 and centre-cropped to 227, as the original toolbox's find_maxes (caffe.Classifier with
    image_dims 256x256, no oversampling) and CaffeNet's training did."""

    def __init__(self, weights: str, mean=None, **kw):
        super().__init__(caffenet_prototxt(), weights, mean=IMAGENET_MEAN_BGR if mean is None else mean,
                         input_size=(227, 227), name="caffenet", **{**CAFFENET_DEFAULTS, **kw})
