"""Portable numerics: the optimizer's images have the same bits for any thread count and for the
CPU kernels another machine would pick, because every reduction follows one written spec."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepvis_repro import numerics
from deepvis_repro.optimize import optimize

UNITS = ["fc:130", "blocks.8:10"]


def digest(result) -> str:
    return hashlib.sha1(result.images.tobytes()).hexdigest()


def test_the_fast_kernels_follow_the_spec():
    """Each library kernel the mode uses equals the spec's own implementation, bit for bit."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 150, generator=g), torch.randn(150, 70, generator=g)
    fast = numerics.block_matmul(a, b)
    with numerics.spec_only():
        slow = numerics.block_matmul(a, b)
    assert torch.equal(fast, slow)
    assert (fast - a.double().matmul(b.double()).float()).abs().max() < 1e-4  # and it is a product
    x = torch.randn(2, 16, 15, 15, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 1, 3, 3, generator=g)
    with numerics.Numerics("portable").active():
        y = F.conv2d(x, w, None, 2, 1, 1, 16)
        with numerics.spec_only():
            y_spec = F.conv2d(x, w, None, 2, 1, 1, 16)
    assert torch.equal(y, y_spec)
    assert torch.allclose(y, F.conv2d(x, w, None, 2, 1, 1, 16), atol=1e-5)


def test_spec_only_gives_the_same_images(lite0):
    """A machine whose kernels all fail verification computes the spec itself: the same image."""
    fast = optimize(lite0, UNITS, "paper_1", steps=4, progress=False, numerics="portable")
    with numerics.spec_only():
        slow = optimize(lite0, UNITS, "paper_1", steps=4, progress=False, numerics="portable")
    assert digest(fast) == digest(slow)
    assert fast.numerics == {"mode": "portable", "native_reductions": []}


def test_thread_count_changes_default_bits_but_not_portable(lite0):
    def run(threads, mode):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return digest(optimize(lite0, UNITS, "paper_3", steps=12, progress=False, numerics=mode))
        finally:
            torch.set_num_threads(before)

    if os.cpu_count() < 2:
        pytest.skip("one CPU: no second thread count to compare")
    assert run(1, "portable") == run(2, "portable")


SCRIPT = """
import hashlib, torch, sys
from deepvis_repro.registry import load_backend
from deepvis_repro.optimize import optimize
torch.set_num_threads(int(sys.argv[1]))
r = optimize(load_backend(), ["fc:130", "blocks.8:10"], "paper_4", steps=10, progress=False, numerics="portable")
print(hashlib.sha1(r.images.tobytes()).hexdigest())
"""


def test_another_machines_kernels_give_the_same_bits():
    """Simulated other machines: AVX2 kernels in ATen, oneDNN and MKL, one thread."""
    def run(env, threads):
        e = {**os.environ, **env}
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(threads)], env=e, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.strip()

    here = run({}, 2)
    other = run({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 1)
    assert here == other


def test_a_model_with_reductions_outside_the_spec_says_so():
    """Reductions the mode does not make portable are named, not silently trusted."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AvgPool2d(2), torch.nn.Softmax(dim=1))
    mode = numerics.Numerics("portable")
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    with mode.active():
        net(x).sum().backward()
    assert {"avg_pool2d", "softmax"} <= set(mode.report()["native_reductions"])


def test_percentile_is_numpys():
    from deepvis_repro.optvis.regularizers import percentile

    v = np.random.default_rng(1).normal(size=(3, 1001))
    for pct in (0, 20, 50, 90, 37.3, 100):
        ours = percentile(torch.from_numpy(v), pct).numpy()
        assert np.array_equal(ours, np.percentile(v, pct, axis=1)), pct
