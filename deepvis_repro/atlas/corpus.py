"""Image corpora for mining: a folder tree (ImageNet's train layout works as is), a text file
listing images, a video, or a small demo corpus made from scikit-image's photos.

A corpus is an ordered list of items; an item's index is its image id in the atlas. Items are
decoded a whole batch at a time by :class:`BatchDecoder` (in DataLoader workers or Ray tasks) into
the image as the network sees it. An unreadable item never stops the run: its slot in the batch is
a blank image, it is flagged, and the miner leaves it out of every top-k.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass

import numpy as np

from ..errors import DeepvisError
from ..files import file_sha256, write_json
from ..images import IMAGE_EXTENSIONS, load_image, resize_for_input, save_image, to_rgb_uint8
from ..view import View


VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".gif")
FRAME_SEP = "#frame="


@dataclass
class Corpus:
    """items: paths (or 'video.mp4#frame=N' for video frames), in id order."""
    items: list[str]
    kind: str                       # folder | list | video | demo | paths
    source: str = ""                # the folder, list file or video it came from

    def __len__(self):
        return len(self.items)

    def identity(self) -> dict:
        """What makes two corpora the same for resuming: kind, count, and a hash of every item's
        name (relative to the source) and size. Cheap (one stat per file), so a 1.28 M-image
        corpus is checked in seconds; a changed, added or removed file changes it."""
        h = hashlib.sha256()
        root = self.source if self.kind in ("folder", "demo") else ""
        for item in self.items:
            path, _, frame = item.partition(FRAME_SEP)
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            name = os.path.relpath(path, root) if root else path
            h.update(f"{name}\0{frame}\0{size}\n".encode("utf-8", "surrogateescape"))
        return {"kind": self.kind, "source": os.path.abspath(self.source) if self.source else "",
                "count": len(self.items), "sha256": h.hexdigest()}


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def folder_corpus(path: str) -> Corpus:
    """Every image file under path, recursively, in sorted path order (symlinked folders are not
    followed: a link back up the tree would loop). A non-regular file with an image's name (a FIFO)
    is listed too: decoding refuses it without reading, and it is counted and named as skipped."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise DeepvisError(f"corpus folder not found: {root}")
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if _is_image_name(f):
                items.append(os.path.join(dirpath, f))  # unreadable ones are reported with their reason
    if not items:
        raise DeepvisError(f"no images in corpus folder {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return Corpus(items, "folder", root)


def list_corpus(path: str) -> Corpus:
    """A text file with one image path per line (relative paths are relative to the file's
    folder; blank lines and lines starting with # are skipped)."""
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # opening a FIFO would wait forever
            raise DeepvisError(f"corpus list {path} is not a regular file (a FIFO or a device?)")
        with open(path, encoding="utf-8") as f:
            lines = [l.strip() for l in f]
    except OSError as e:
        raise DeepvisError(f"cannot read corpus list {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DeepvisError(f"corpus list {path} is not a UTF-8 text file") from None
    base = os.path.dirname(os.path.abspath(path))
    items = [l if os.path.isabs(l) else os.path.join(base, l) for l in lines if l and not l.startswith("#")]
    if not items:
        raise DeepvisError(f"corpus list {path} names no images")
    return Corpus(items, "list", path)


def video_corpus(path: str, every: int = 1) -> Corpus:
    """Every ``every``-th frame of a video (PyAV / FFmpeg). The frames are counted once here."""
    import av

    path = os.fspath(path)
    if int(every) < 1:
        raise DeepvisError(f"corpus.every must be at least 1, got {every}")
    try:
        with av.open(path) as c:
            stream = c.streams.video[0]
            n = sum(1 for _ in c.demux(stream) if _.size)  # packets, not decoded frames: fast
    except (av.error.FFmpegError, IndexError, ValueError, OSError) as e:
        raise DeepvisError(f"cannot decode video {path}: {str(e) or 'no video stream'}") from None
    if not n:
        raise DeepvisError(f"video {path} has no frames")
    items = [f"{path}{FRAME_SEP}{i}" for i in range(0, n, int(every))]
    return Corpus(items, "video", path)


#: (name, crop boxes as fractions (top, left, bottom, right)) for the demo corpus.
DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
               "stereo_motorcycle", "colorwheel", "camera", "coins", "clock", "brick", "grass", "gravel",
               "moon", "page", "text", "horse", "retina", "logo")
DEMO_VIEWS = ((0, 0, 1, 1), (0, 0, .6, .6), (0, .4, .6, 1), (.4, 0, 1, .6), (.4, .4, 1, 1),
              (.2, .2, .8, .8), (0, .2, .6, .8), (.4, .2, 1, .8), (.2, 0, .8, .6), (.2, .4, .8, 1))


def demo_corpus(folder: str | None = None) -> Corpus:
    """Views (crops and mirror images) of scikit-image's sample photos, written once as PNG files:
    a few hundred real images that ship with a dependency, so mining runs with no download.
    The folder's COMPLETE marker lists every file's SHA-256: a file deleted, truncated or edited
    since makes the folder be written again (not mined with one image fewer). An unwritable cache
    means a temporary folder for this process, the same images."""
    folder = folder or os.path.join(cache_root(), "demo_corpus")
    if not _demo_intact(folder):
        try:
            _write_demo(folder)
        except (OSError, DeepvisError):
            import atexit
            import shutil
            import tempfile

            folder = tempfile.mkdtemp(prefix="deepvis-demo-corpus-")
            atexit.register(shutil.rmtree, folder, True)
            _write_demo(folder)
    c = folder_corpus(folder)
    return Corpus(c.items, "demo", folder)


def _demo_intact(folder: str) -> bool:
    import json

    try:
        with open(os.path.join(folder, "COMPLETE"), encoding="utf-8") as f:
            files = json.load(f)
        return isinstance(files, dict) and len(files) == len(DEMO_PHOTOS) * len(DEMO_VIEWS) * 2 and all(
            file_sha256(os.path.join(folder, name)) == digest for name, digest in files.items())
    except (OSError, ValueError, TypeError):
        return False


def _write_demo(folder: str) -> None:
    import skimage.data

    os.makedirs(folder, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, "COMPLETE"))
    files = {}
    for name in DEMO_PHOTOS:
        img = getattr(skimage.data, name)()
        img = to_rgb_uint8(img[0] if isinstance(img, tuple) else img)
        h, w = img.shape[:2]
        for v, (t, l, b, r) in enumerate(DEMO_VIEWS):
            view = img[int(t * h):int(b * h), int(l * w):int(r * w)]
            scale = 256 / min(view.shape[:2])
            size = (max(256, round(view.shape[0] * scale)), max(256, round(view.shape[1] * scale)))
            view = resize_for_input(view, size, crop=True)
            for flip in (False, True):
                out = view[:, ::-1] if flip else view
                fname = f"{name}_{v:02d}{'_m' if flip else ''}.png"
                save_image(os.path.join(folder, fname), out)
                files[fname] = file_sha256(os.path.join(folder, fname))
    write_json(os.path.join(folder, "COMPLETE"), files)


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deepvis-repro")


def open_corpus(path: str | None = None, every: int = 1) -> Corpus:
    """A folder, a .txt list, a video file, or None for the demo corpus."""
    if path in (None, "", "demo"):
        return demo_corpus()
    path = os.fspath(path)
    if os.path.isdir(path):
        return folder_corpus(path)
    if not os.path.exists(path):
        raise DeepvisError(f"corpus not found: {path} (give a folder of images, a .txt list of "
                           "image paths, or a video file)")
    if not stat.S_ISREG(os.stat(path).st_mode):  # opening a FIFO or a device would wait forever
        raise DeepvisError(f"corpus {path} is not a regular file or a folder (a FIFO or a device?)")
    low = path.lower()
    if low.endswith((".txt", ".lst", ".list")):
        return list_corpus(path)
    if low.endswith(VIDEO_EXTENSIONS):
        return video_corpus(path, every)
    raise DeepvisError(f"corpus {path}: not a folder, a .txt list or a video "
                       f"({', '.join(VIDEO_EXTENSIONS)})")


def as_corpus(paths) -> Corpus:
    """A Corpus from what a Python caller passes: a Corpus, a path (folder, list, video) or a
    list of image paths."""
    if isinstance(paths, Corpus):
        return paths
    if isinstance(paths, (str, os.PathLike)) or paths is None:
        return open_corpus(None if paths is None else os.fspath(paths))
    items = [os.fspath(p) for p in paths]
    if not items:
        raise DeepvisError("the corpus is empty: give at least one image")
    return Corpus(items, "paths", "")


# ----- decoding ---------------------------------------------------------------------------------
class BatchDecoder:
    """Decodes a batch of items into the network's view: (B, H, W, 3) uint8, an ok flag per item
    and the error of each failed one. Holds plain data only (the view), so it pickles cheaply to
    worker processes and Ray tasks; the items travel with each batch."""

    def __init__(self, view: dict):
        self.view = View.from_dict(view)

    def fit(self, image: np.ndarray) -> np.ndarray:
        return self.view.fit(image)

    def __call__(self, items: list[str]) -> dict:
        h, w = self.view.input_size
        out = np.zeros((len(items), h, w, 3), np.uint8)
        ok = np.zeros(len(items), bool)
        errors: list[str] = [""] * len(items)
        decoded = load_items(items)
        for j, img in enumerate(decoded):
            try:
                if isinstance(img, Exception):
                    raise img
                out[j] = self.fit(img)
                ok[j] = True
            except DeepvisError as e:
                errors[j] = str(e)
            except Exception as e:  # a decoder bug on one odd file must not end a night's run
                errors[j] = f"{type(e).__name__}: {e}"
        return {"images": out, "ok": ok, "errors": errors}


def load_items(items: list[str]) -> list:
    """Decode items (image paths or video frames) as HxWx3 uint8, or the exception that each
    failed with; frames of one video are decoded in one forward pass."""
    out: list = [None] * len(items)
    videos: dict[str, list[int]] = {}
    for j, item in enumerate(items):
        if FRAME_SEP in item:
            videos.setdefault(item.partition(FRAME_SEP)[0], []).append(j)
            continue
        try:
            out[j] = load_image(item)
        except Exception as e:
            out[j] = e
    for path, js in videos.items():
        frames = _video_frames(path, [int(items[j].partition(FRAME_SEP)[2]) for j in js])
        for j in js:
            f = frames.get(int(items[j].partition(FRAME_SEP)[2]))
            out[j] = f if f is not None else DeepvisError(f"cannot decode frame of {items[j]}")
    return out


def _video_frames(path: str, indices: list[int]) -> dict[int, np.ndarray]:
    """Frames of one video by index: seek to the keyframe before the first, decode forward."""
    import av

    want = set(indices)
    got: dict[int, np.ndarray] = {}
    first, last = min(want), max(want)
    try:
        with av.open(path) as c:
            stream = c.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            start = stream.start_time or 0
            tb = stream.time_base
            timed = bool(rate and tb)
            if first and timed:
                c.seek(int(start + (first / float(rate)) / float(tb)) - 1, stream=stream,
                       backward=True, any_frame=False)
            index = None
            for frame in c.decode(stream):
                if frame.pts is not None and timed:
                    index = round((frame.pts - start) * float(tb) * float(rate))
                else:
                    index = 0 if index is None else index + 1
                if index in want:
                    got[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
    except (av.error.FFmpegError, ValueError, OSError):
        pass  # frames not decoded are reported as unreadable
    return got
