"""Live-view speed on the embedded model: network updates per second and display frames per
second, headless (SDL dummy driver), on a video source so the network always has a new frame.

    python benchmarks/bench_live.py [--seconds 10]

Prints one line per back mode (off, gradient, deconv) and writes nothing else.
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import av
import numpy as np
import skimage.data

import deepvis_repro as dv
from deepvis_repro.live.app import LiveApp
from deepvis_repro.live.sources import VideoSource


def make_video(path: str, seconds: int = 4, fps: int = 30) -> None:
    """A real H.264 clip: a slow pan across scikit-image's astronaut photo."""
    img = skimage.data.astronaut()
    with av.open(path, "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 320, 320, "yuv420p"
        for k in range(seconds * fps):
            x = int(k * (512 - 320) / (seconds * fps))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[96:416, x:x + 320]), format="rgb24")
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--layer", default="blocks.5")
    args = ap.parse_args()
    backend = dv.load_backend()
    with tempfile.TemporaryDirectory() as tmp:
        video = os.path.join(tmp, "pan.mp4")
        make_video(video)
        for keys, mode in (([], "off"), (["b"], "gradient"), (["b", "b"], "deconv")):
            frames = int(args.seconds * 30)
            app = LiveApp(backend, VideoSource(video), max_frames=frames, keys=keys, layer=args.layer)
            s = app.run()
            print(f"back {mode:<8} layer {args.layer}: network {s['net_fps']:.1f} fps "
                  f"({s['net_ms_per_pass']:.0f} ms per pass), display {s['display_fps']:.1f} fps "
                  f"over {s['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
