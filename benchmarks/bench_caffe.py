"""A CaffeNet-sized Caffe model: the paper's CaffeNet prototxt with random weights of the real
shapes (61M parameters, a 233 MB caffemodel, written here). Timed: the direct route's first load
(parse + convert + cache write) and second load (from the cache), then deepvis-convert to ONNX
end to end (a fresh process, as a user runs it), and the ONNX route's first load.

    python benchmarks/bench_caffe.py
    python benchmarks/bench_caffe.py --caffe2onnx /path/to/python   # caffe2onnx on the same file

caffe2onnx 2.0.1 pins onnx 1.6, so it goes in a separate virtual environment, without its
dependencies (it then runs on today's onnx, with the slow pure-Python protobuf it needs):
    python -m venv --system-site-packages /tmp/c2o && /tmp/c2o/bin/pip install --no-deps caffe2onnx==2.0.1
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import deepvis_repro as dv
from deepvis_repro_backends import caffe_proto
from deepvis_repro_backends.caffe_backend import caffenet_prototxt
from deepvis_repro_backends.caffe_net import read_prototxt

SHAPES = {"conv1": [(96, 3, 11, 11), (96,)], "conv2": [(256, 48, 5, 5), (256,)],
          "conv3": [(384, 256, 3, 3), (384,)], "conv4": [(384, 192, 3, 3), (384,)],
          "conv5": [(256, 192, 3, 3), (256,)], "fc6": [(4096, 9216), (4096,)],
          "fc7": [(4096, 4096), (4096,)], "fc8": [(1000, 4096), (1000,)]}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def write_caffemodel(path: str, seed: int = 0) -> None:
    """Caffe's binary format, written field by field so 61M floats need no Python list."""
    rng = np.random.default_rng(seed)
    net = read_prototxt(caffenet_prototxt())
    with open(path, "wb") as f:
        for layer in net.layer:
            msg = caffe_proto.message("LayerParameter")()
            msg.CopyFrom(layer)
            body = msg.SerializeToString()
            for shape in SHAPES.get(layer.name, []):
                blob = caffe_proto.BlobProto()
                blob.shape.dim.extend(shape)
                data = rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.01
                body += _field(7, blob.SerializeToString() + _field(5, data.astype("<f4").tobytes()))
            f.write(_field(100, body))


def timed(cmd, env=None):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--caffe2onnx", default=None, help="a python with caffe2onnx installed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "caffenet.caffemodel")
        t = time.perf_counter()
        write_caffemodel(model)
        print(f"wrote a {os.path.getsize(model) / 2**20:.0f} MiB caffemodel in {time.perf_counter() - t:.1f} s")
        cache = os.path.join(tmp, "cache")
        for label in ("first load (parse, convert, cache)", "second load (cache)"):
            t = time.perf_counter()
            b = dv.load_backend("caffenet", weights=model, cache_dir=cache)
            print(f"{label}: {time.perf_counter() - t:.2f} s", flush=True)
        print(f"layers: {' '.join(b.layers)}")
        out = os.path.join(tmp, "caffenet.onnx")
        seconds, r = timed(["deepvis-convert", "backend=caffenet", f"backend.weights={model}", "backend.cache_dir=",
                            f"output={out}"])
        if r.returncode:
            sys.exit(f"deepvis-convert failed: {r.stderr.strip()}")
        print(f"deepvis-convert, end to end (a new process: imports, parse, write, full check): {seconds:.2f} s, "
              f"{os.path.getsize(out) / 2**20:.0f} MiB .onnx", flush=True)
        t = time.perf_counter()
        dv.load_backend("caffenet", weights=model, cache_dir=cache, via="onnx")
        print(f"backend.via=onnx, first load (convert, cache, onnx2torch): {time.perf_counter() - t:.2f} s", flush=True)
        t = time.perf_counter()
        dv.load_backend("caffenet", weights=model, cache_dir=cache, via="onnx")
        print(f"backend.via=onnx, second load (cached .onnx, onnx2torch): {time.perf_counter() - t:.2f} s", flush=True)
        if args.caffe2onnx:
            env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
            seconds, r = timed([args.caffe2onnx, "-m", "caffe2onnx.convert", "--prototxt", caffenet_prototxt(),
                                "--caffemodel", model, "--onnx", os.path.join(tmp, "c2o.onnx")], env=env)
            status = "ok" if r.returncode == 0 else f"failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:160]}"
            print(f"caffe2onnx 2.0.1, end to end, the same file: {seconds:.2f} s ({status})")


if __name__ == "__main__":
    main()
