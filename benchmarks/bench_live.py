"""Live-view speed on the embedded model: network updates per second and display frames per
second, headless (SDL dummy driver), on a video source so the network always has a new frame.

    python benchmarks/bench_live.py [--seconds 10] [--no-atlas] [--device cuda]

Prints one line per back mode (off, gradient, deconv) and numerics (default: float32; bf16). Then, with a unit atlas (mined from the
demo corpus into a temporary folder): the view on layer fc while the cursor moves fast (the pane
loads each unit's pictures) and then rests on a unit without an optimized image (the on-demand
job makes one): the network's ms per pass and the display rate inside and outside the job, the
longest gap between two display frames, and the time from resting on the unit to its image.
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import av
import numpy as np
import skimage.data
import torch

import deepvis_repro as dv
from deepvis_repro.allocator import keep_freed_memory
from deepvis_repro.live.app import LiveApp
from deepvis_repro.live.sources import VideoSource
from deepvis_repro.outputs import machine


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
    ap.add_argument("--steps", type=int, default=80, help="on-demand optimization steps")
    ap.add_argument("--no-atlas", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    keep_freed_memory()  # what every deepvis command does first (deepvis_repro/allocator.py)
    backend = dv.load_backend(device=args.device)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else machine()["cpu"]
    print(f"device: {args.device} ({name})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        video = os.path.join(tmp, "pan.mp4")
        make_video(video)
        for numerics in ("default", "bf16"):
            for keys, mode in (([], "off"), (["b"], "gradient"), (["b", "b"], "deconv")):
                frames = int(args.seconds * 30)
                app = LiveApp(backend, VideoSource(video), max_frames=frames, keys=keys, layer=args.layer,
                              numerics=numerics)
                s = app.run()
                print(f"numerics {numerics:<7} back {mode:<8} layer {args.layer}: network {s['net_fps']:.1f} fps "
                      f"({s['net_ms_per_pass']:.0f} ms per pass), display {s['display_fps']:.1f} fps "
                      f"over {s['seconds']:.1f} s", flush=True)
        if not args.no_atlas:
            atlas_run(backend, video, tmp, args)


def atlas_run(backend, video, tmp, args):
    from deepvis_repro.atlas import mine
    from deepvis_repro.atlas.patches import render_montages

    atlas = os.path.join(tmp, "atlas")
    mine(backend, None, ["fc"], top_k=9, atlas_dir=atlas, progress=False)
    render_montages(backend, atlas, units=range(12), progress=False)
    moves = ["l"] * 10  # one key per frame: the cursor crosses 10 units in a third of a second
    frames = int(args.seconds * 30) + len(moves)
    app = LiveApp(backend, VideoSource(video), max_frames=frames, keys=moves, layer="fc", atlas=atlas,
                  on_demand={"preset": "paper_3", "steps": args.steps}, sync_timeout=60)
    s = app.run()
    jobs = s["on_demand"]["done"]
    if not jobs:
        print("on-demand: no image was made within the run (raise --seconds)")
        return
    job = jobs[0]
    t0, t1 = job["started"], job["finished"]
    inside = [dt for t, dt in app.net.log if t0 <= t <= t1]
    outside = [dt for t, dt in app.net.log if not t0 - 0.5 <= t <= t1 + 0.5]
    f_in = [t for t in app.frame_log if t0 <= t <= t1]
    gaps = np.diff(app.frame_log[1:]) if len(app.frame_log) > 2 else np.zeros(1)
    print(f"atlas pane + on-demand ({job['setting']}, {job['steps']} steps, 1 thread, nice 10) on layer fc:")
    print(f"  network: {1000 * np.mean(outside):.0f} ms per pass without the job, "
          f"{1000 * np.mean(inside):.0f} ms per pass while it runs ({len(inside)} passes)")
    print(f"  display: {len(f_in) / max(t1 - t0, 1e-9):.1f} fps while it runs, "
          f"{s['display_fps']:.1f} fps over the run; longest frame gap {1000 * gaps.max():.0f} ms")
    print(f"  {job['unit']}: image after {job['seconds']:.1f} s of optimization, "
          f"{job['seconds_since_selected']:.1f} s after the cursor came to rest on it; "
          f"{s['pane']['loads']} pane loads")


if __name__ == "__main__":
    main()
