"""The atlas on disk: a documented layout that the live view and other tools read.

    <atlas>/
      manifest.json                 what made it: backend (name, weights hash), corpus (kind, count,
                                    hash), layers (channels, map shape, receptive-field geometry),
                                    k, negatives, the network's view of an image, versions, state
      corpus.txt                    the images, one per line; line i (from 0) is image id i
      skipped.tsv                   unreadable images: id, path, reason
      layers/<layer>.npz            per layer: values (C, k) float32 in descending order,
                                    image_ids (C, k) int64 (-1: fewer than k images), positions
                                    (C, k, 2) int32 (y, x) in the layer's map; with negatives also
                                    min_values / min_image_ids / min_positions (ascending)
      max_im/<layer>/<layer>_%04d.jpg       3x3 montage of the unit's top-9 patches
      max_deconv/<layer>/<layer>_%04d.jpg   3x3 montage of their deconv (or guided backprop)
      min_im/<layer>/<layer>_%04d.jpg       the 9 most negative patches (with negatives)
      regularized_opt/<layer>/<layer>_%04d.jpg   the unit's optimized image (deepvis-optimize)
      regularized_opt/<layer>/whole_layer.jpg    every unit's optimized image, one square sprite
      checkpoint/                   mining state while a run is unfinished (resume from it)

The image names follow the original toolbox's unit_jpg_vis folder, so its tools read ours and our
live view reads its downloads (see :class:`AtlasReader`).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from ..errors import DeepvisError
from ..files import folder_lock, load_sealed_npz, tensors_sha256, write_bytes, write_json


FORMAT = "deepvis-atlas/1"
#: The manifest's keys and their JSON types.
MANIFEST_TYPES = {"state": str, "mining": dict, "backend": dict, "layers": dict, "top_k": int,
                  "corpus_items": int, "negatives": bool, "skipped": int}
#: The original toolbox showed pooling layers with their conv layer's images.
CAFFENET_REMAP = {"pool1": "conv1", "pool2": "conv2", "pool5": "conv5"}
KINDS = ("regularized_opt", "max_im", "max_deconv", "min_im")


def layer_slug(layer: str) -> str:
    """A file-name-safe form of a layer name ('layer3/0/conv1' -> 'layer3-0-conv1')."""
    slug = re.sub(r"[^A-Za-z0-9._+-]", "-", str(layer)).strip(".")
    return slug or "layer"


def unit_file(root: str, kind: str, layer: str, unit: int, suffix: str = ".jpg") -> str:
    slug = layer_slug(layer)
    return os.path.join(root, kind, slug, f"{slug}_{int(unit):04d}{suffix}")


def backend_identity(backend) -> dict:
    """Name, input view and a hash of every weight and buffer (layout-independent): two atlases
    with the same identity were made by the same function of the pixels."""
    mean = backend.mean.detach().cpu().float().contiguous().numpy()
    return {"name": backend.name, "weights_sha256": tensors_sha256(backend.module.state_dict(), mean.tobytes()),
            **backend.view_spec()}


def reading_path(store: AtlasStore, layer: str) -> str:
    return store.path("reading", f"{layer_slug(layer)}.json")


def load_reading(root, layer: str) -> dict | None:
    """A layer's stored reading, or None (not made, or unreadable: a reading is never a reason
    not to show the pictures)."""
    try:
        with open(reading_path(AtlasStore(root), layer), encoding="utf-8") as f:
            r = json.load(f)
        return r if isinstance(r, dict) and isinstance(r.get("units"), list) else None
    except (OSError, ValueError):
        return None


def describe(reading: dict | None, unit: int) -> str | None:
    """One line: "its top patches look like: tabby cat 4/9, tiger cat 2/9"."""
    if not reading or not 0 <= unit < len(reading["units"]) or not reading["units"][unit]:
        return None
    k = reading.get("k", 9)
    what = "patches" if reading.get("basis") == "patches" else "images"
    return f"its top {what} look like: " + ", ".join(f"{label} {n}/{k}" for label, n in reading["units"][unit])


class AtlasStore:
    """Paths and files of one atlas folder (ours); reading and writing, atomically."""

    def __init__(self, root):
        self.root = os.fspath(root)

    def path(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    def model(self) -> dict | None:
        """The identity of the model whose pictures this atlas holds (from its mining, or from
        optimized images written into it first), or None for a new atlas."""
        m = self.manifest() or {}
        return (m.get("mining") or {}).get("backend") or m.get("backend")

    def check_model(self, backend) -> None:
        """An atlas holds one model's pictures: record this model in a new atlas, or refuse
        another model's weights. (Resuming a mining run asks more, the same view and corpus too:
        mining._differs.)"""
        ours, theirs = backend_identity(backend), self.model()
        if theirs is None:
            if self.manifest() is None:
                self.write_manifest({"state": "optimized", "backend": ours})
            return
        if theirs.get("weights_sha256") != ours["weights_sha256"]:
            raise DeepvisError(f"atlas {self.root} holds pictures of another model ({theirs.get('name')} "
                               f"weights {theirs.get('weights_sha256', '')[:12]}, not {ours['name']} "
                               f"{ours['weights_sha256'][:12]}): give another atlas.dir")

    def writer(self):
        """Hold the atlas for one writer (files.folder_lock): a second run on the same folder is
        refused in one line naming the first; what a dead writer left is then stale by definition."""
        return folder_lock(self.root, "atlas", "wait for it to finish, or give another atlas.dir")

    @property
    def manifest_path(self) -> str:
        return self.path("manifest.json")

    def manifest(self) -> dict | None:
        if not os.path.isfile(self.manifest_path):
            return None
        try:
            with open(self.manifest_path, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            raise DeepvisError(f"atlas {self.root}: manifest.json is unreadable ({e}); "
                               "move the folder away or give another atlas.dir") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise DeepvisError(f"atlas {self.root}: manifest.json is not a {FORMAT} manifest")
        for key, kind in MANIFEST_TYPES.items():  # a hand-edited manifest fails here, in one line
            if key in m and m[key] is not None and not isinstance(m[key], kind):
                raise DeepvisError(f"atlas {self.root}: manifest.json's '{key}' is a {type(m[key]).__name__}, "
                                   f"not a {kind.__name__ if isinstance(kind, type) else kind[0].__name__}")
        for layer, info in (m.get("layers") or {}).items():
            if not isinstance(info, dict):
                raise DeepvisError(f"atlas {self.root}: manifest.json's entry for layer {layer} is not an object")
        return m

    def write_manifest(self, manifest: dict) -> None:
        os.makedirs(self.root, exist_ok=True)
        write_json(self.manifest_path, {"format": FORMAT, **manifest})

    def write_corpus(self, items: list[str]) -> None:
        # surrogateescape: a file name that is not UTF-8 goes back to disk as the bytes it was
        write_bytes(self.path("corpus.txt"), "".join(f"{p}\n" for p in items).encode("utf-8", "surrogateescape"))

    def corpus(self) -> list[str]:
        try:
            with open(self.path("corpus.txt"), encoding="utf-8", errors="surrogateescape") as f:
                items = [l.rstrip("\n") for l in f]
        except OSError as e:
            raise DeepvisError(f"atlas {self.root}: corpus.txt is unreadable ({e.strerror})") from None
        n = (self.manifest() or {}).get("corpus_items")
        if n is not None and len(items) != n:
            raise DeepvisError(f"atlas {self.root}: corpus.txt lists {len(items)} images, the manifest "
                               f"{n} (truncated or edited)")
        return items

    def write_skipped(self, skipped: list[tuple[int, str, str]]) -> None:
        lines = ["id\tpath\treason\n"] + [f"{i}\t{p}\t{r.replace(chr(9), ' ').replace(chr(10), ' ')}\n"
                                         for i, p, r in skipped]
        write_bytes(self.path("skipped.tsv"), "".join(lines).encode("utf-8", "surrogateescape"))

    def layer_arrays_path(self, layer: str) -> str:
        return self.path("layers", f"{layer_slug(layer)}.npz")

    def layer_arrays(self, layer: str) -> dict[str, np.ndarray]:
        """A layer's mined arrays, checked against their digest and the manifest (channels, k, the
        corpus's size): a damaged or hand-edited file is a DeepvisError, never a result."""
        p = self.layer_arrays_path(layer)
        if not os.path.isfile(p):
            raise DeepvisError(f"atlas {self.root} has no mined data for layer {layer}")
        m = self.manifest() or {}
        info = (m.get("layers") or {}).get(layer) or {}
        a = load_sealed_npz(p, "atlas layer file", info.get("sha256"))
        try:
            channels, k = info.get("channels"), m.get("top_k")
            ok = a["values"].ndim == 2 and a["values"].shape == a["image_ids"].shape and \
                a["positions"].shape[:2] == a["values"].shape
            if ok and channels is not None:
                ok = a["values"].shape[0] == int(channels) and (k is None or a["values"].shape[1] == int(k))
            items = m.get("corpus_items")
            if ok and items is not None:
                ids = a["image_ids"]
                ok = bool(((ids >= -1) & (ids < int(items))).all())
            shape = info.get("shape")
            if ok and shape and len(shape) == 3:  # a position inside the layer's map (or -1: none)
                pos = a["positions"]
                bound = np.array(shape[1:]) + np.array([1 if info.get("prefix") else 0, 0])  # row H: prefix tokens
                ok = bool(((pos >= -1) & (pos < bound)).all())
        except (KeyError, TypeError, ValueError) as e:
            raise DeepvisError(f"atlas layer file {p} is damaged ({e})") from None
        if not ok:
            raise DeepvisError(f"atlas layer file {p} does not match the atlas's manifest (shapes or image ids): "
                               "damaged or edited; mine again into a new atlas.dir")
        return a

    def unit_file(self, kind: str, layer: str, unit: int, suffix: str = ".jpg") -> str:
        return unit_file(self.root, kind, layer, unit, suffix)

    def whole_layer(self, layer: str) -> str:
        return self.path("regularized_opt", layer_slug(layer), "whole_layer.jpg")


class AtlasReader:
    """Finds a unit's pictures in an atlas folder: one of ours (manifest.json), or the original
    toolbox's downloaded unit_jpg_vis folder (no manifest; its regularized_opt images are
    ``<layer>_%04d_montage.jpg`` montages, whose bottom-left quadrant the pane shows, and its
    pool layers use their conv layer's images)."""

    def __init__(self, root):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DeepvisError(f"atlas folder not found: {self.root}")
        store = AtlasStore(self.root)
        self.manifest = store.manifest()
        self.original = self.manifest is None
        if self.original and not any(os.path.isdir(os.path.join(self.root, k)) for k in KINDS):
            raise DeepvisError(f"{self.root} is not an atlas: no manifest.json and none of "
                               f"{', '.join(k + '/' for k in KINDS)}")

    @property
    def top_k(self) -> int:
        """Images per unit in the montages (the original toolbox's: 9)."""
        return int((self.manifest or {}).get("top_k") or 9)

    def layer_folder(self, layer: str) -> str:
        if self.original:
            return CAFFENET_REMAP.get(layer, layer)
        return layer_slug(layer)

    def files(self, layer: str, unit: int) -> dict[str, tuple[str, bool]]:
        """kind -> (path, crop the bottom-left quadrant?) for each kind; paths may not exist."""
        name = self.layer_folder(layer)
        out = {}
        for kind in KINDS:
            folder = os.path.join(self.root, kind, name)
            if kind == "regularized_opt":
                montage = os.path.join(folder, f"{name}_{int(unit):04d}_montage.jpg")
                if self.original or os.path.isfile(montage):
                    out[kind] = (montage, True)
                    continue
            out[kind] = (os.path.join(folder, f"{name}_{int(unit):04d}.jpg"), False)
        return out

    def whole_layer(self, layer: str) -> str:
        return os.path.join(self.root, "regularized_opt", self.layer_folder(layer), "whole_layer.jpg")

    def reading(self, layer: str, unit: int) -> str | None:
        """The unit's reading in one line (atlas/reading.py), or None where none is stored (the
        original's downloads have none); each layer's file read once."""
        if self.original:
            return None
        cache = self.__dict__.setdefault("_readings", {})
        if layer not in cache:
            cache[layer] = load_reading(self.root, layer)
        return describe(cache[layer], unit)

    def back_mode(self, layer: str) -> str:
        """What the max_deconv pictures of a layer show, in words (the original's: deconv)."""
        mode = ((self.manifest or {}).get("montages", {}).get(layer) or {}).get("mode", "deconv")
        return {"guided": "guided backprop", "gradient": "gradient"}.get(mode, "deconv")
