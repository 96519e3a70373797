"""Frame sources for the live view (Hydra group conf/source/): a webcam, a video file, a folder
of images, or one image. Each returns HxWx3 uint8 RGB frames; errors a user can cause are
DeepvisErrors with one clear line, and a bad file inside a folder is skipped and named."""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from ..errors import DeepvisError
from ..images import IMAGE_EXTENSIONS, load_image


class Source:
    """A frame source. ``read()`` returns the current frame (or None when there is none yet);
    ``live`` sources change by themselves (camera, video), still ones only on next()/prev()."""
    name = "source"
    live = False
    message = ""  # shown in the status line (e.g. skipped files)

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def next(self) -> None:
        pass

    def prev(self) -> None:
        pass

    def close(self) -> None:
        pass


class ImageSource(Source):
    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.frame = load_image(self.path)
        self.name = os.path.basename(self.path)

    def read(self):
        return self.frame


class ImageFolderSource(Source):
    """Every image in a folder, in name order; e/w step through them. Unreadable files are skipped
    and named in the status line."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise DeepvisError(f"image folder not found: {self.path}")
        self.files = sorted(f for f in os.listdir(self.path)
                            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not self.files:
            raise DeepvisError(f"no images in folder {self.path} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.skipped: list[str] = []
        self.index = -1
        self.frame = None
        self._step(+1)
        if self.frame is None:
            raise DeepvisError(f"no readable images in folder {self.path}: all {len(self.files)} failed to load")

    @property
    def name(self):
        return f"{self.files[self.index]} ({self.index + 1}/{len(self.files)})"

    @property
    def message(self):
        return f"skipped unreadable: {', '.join(self.skipped[-3:])}" if self.skipped else ""

    def _step(self, d: int):
        for _ in range(len(self.files)):
            self.index = (self.index + d) % len(self.files)
            try:
                self.frame = load_image(os.path.join(self.path, self.files[self.index]))
                return
            except DeepvisError:
                if self.files[self.index] not in self.skipped:
                    self.skipped.append(self.files[self.index])

    def read(self):
        return self.frame

    def next(self):
        self._step(+1)

    def prev(self):
        self._step(-1)


class VideoSource(Source):
    """A video file decoded with PyAV (FFmpeg), played at its own frame rate and looped."""
    live = True

    def __init__(self, path: str, loop: bool = True):
        import av

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise DeepvisError(f"video file not found: {self.path}")
        self.loop = loop
        try:
            self.container = av.open(self.path)
            self.stream = self.container.streams.video[0]
        except (av.error.FFmpegError, IndexError, ValueError) as e:
            raise DeepvisError(f"cannot decode video {self.path}: {str(e) or 'no video stream'}") from None
        fmt = self.container.format.name or ""
        if self.path.lower().endswith(IMAGE_EXTENSIONS) and not self.path.lower().endswith(".gif") \
                or fmt == "image2" or fmt.endswith("_pipe"):
            self.container.close()
            raise DeepvisError(f"cannot decode video {self.path}: it is an image; use source=image "
                               f"source.path={self.path}")
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.period = 1.0 / float(rate) if rate else 1.0 / 25
        self.name = os.path.basename(self.path)
        self._frames = self.container.decode(self.stream)
        self.frame = None
        self.frames_read = 0
        self._t_next = 0.0
        self._lock = threading.Lock()
        self._advance()
        if self.frame is None:
            raise DeepvisError(f"cannot decode video {self.path}: no frames")
        self._t_next = time.perf_counter() + self.period  # the first frame is shown for its period

    def _advance(self):
        import av

        try:
            self.frame = next(self._frames).to_ndarray(format="rgb24")
            self.frames_read += 1
        except StopIteration:
            if self.loop and self.frames_read:
                try:
                    self.container.seek(0)
                    self._frames = self.container.decode(self.stream)
                    self.frame = next(self._frames).to_ndarray(format="rgb24")
                except (StopIteration, av.error.FFmpegError, ValueError):
                    self.loop = False  # it cannot rewind: keep showing the last frame
                    self.message = "video ended (it cannot be rewound)"
        except (av.error.FFmpegError, ValueError) as e:
            self.message = f"video decode error: {e}"

    def read(self):
        with self._lock:
            now = time.perf_counter()
            if now >= self._t_next:
                self._advance()
                self._t_next = max(self._t_next + self.period, now)
            return self.frame

    def next(self):  # skip ahead one second
        with self._lock:
            for _ in range(int(round(1 / self.period))):
                self._advance()

    def close(self):
        self.container.close()


class WebcamSource(Source):
    """A camera through pygame.camera, mirrored by default (like looking in a mirror)."""
    live = True

    def __init__(self, device: str | int | None = None, size=(640, 480), mirror: bool = True):
        import pygame
        import pygame.camera

        try:
            pygame.camera.init()
            cams = pygame.camera.list_cameras()
        except Exception as e:  # no backend for this platform
            raise DeepvisError(f"no camera support on this system: {e}") from None
        if not cams:
            raise DeepvisError("no camera found; use source=images source.path=DIR, "
                               "source=video source.path=FILE or source=image source.path=FILE")
        dev = cams[0] if device in (None, "") else (cams[int(device)] if str(device).isdigit()
                                                     and int(device) < len(cams) else device)
        try:
            self.cam = pygame.camera.Camera(dev, tuple(size), "RGB")
            self.cam.start()
        except Exception as e:
            raise DeepvisError(f"cannot open camera {dev}: {e}; cameras found: {', '.join(map(str, cams))}") from None
        self.mirror = mirror
        self.name = f"camera {dev}"
        self.frame = None

    def read(self):
        import pygame

        if self.cam.query_image() or self.frame is None:
            surf = self.cam.get_image()
            frame = pygame.surfarray.array3d(surf).transpose(1, 0, 2)
            self.frame = frame[:, ::-1].copy() if self.mirror else frame
        return self.frame

    def close(self):
        self.cam.stop()
