"""Loading a CaffeNet-sized Caffe model: the paper's CaffeNet prototxt with random weights of the
real shapes (61M parameters, a 233 MB caffemodel, written here), first load (parse + convert +
cache write) and second load (from the cache).

    python benchmarks/bench_caffe.py
"""
from __future__ import annotations

import os
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


def main():
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


if __name__ == "__main__":
    main()
