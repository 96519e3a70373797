"""The allocator setting every command makes (deepvis_repro/allocator.py): freed tensors' memory
is reused instead of being handed back to the system and faulted in again."""
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
from deepvis_repro.allocator import keep_freed_memory
if sys.argv[1] == "fixed":
    assert keep_freed_memory()
def step():  # what a backward pass does: tensors of several MB, all freed at its end
    ts = [torch.ones(5 * 1024 * 1024) for _ in range(6)]  # 20 MB each, every page written
    del ts
step(); step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_not_faulted_in_again():
    """Three rounds of six 20-MB tensors written and freed, after two to warm up: with glibc's
    defaults the freed top of the heap (120 MB, above its trim threshold) goes back to the system
    and every page is faulted in again next round (measured: 92,064 faults, at any thread count);
    with the thresholds fixed it is reused (0). (A real backward pass was the first workload
    tried: glibc's own adaptive threshold made its count vary from 0 to 40,000 between runs.)"""
    def faults(mode):
        r = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1])

    # fixed: at most two of the 18 tensors' pages faulted in over the three rounds (reused, not
    # handed back), in every run; without reuse it is all 18 (92,160 pages)
    fixed = max(faults("fixed") for _ in range(2))
    assert fixed <= 2 * 5120, fixed
    # glibc's default hands the freed heap back, though not in every run: its heap's layout (where
    # the kernel places it) decides whether the top can be trimmed; one CI run kept it (5,120 faults)
    default = 0
    for _ in range(3):
        default = max(default, faults("default"))
        if default > 5 * max(fixed, 1):
            break
    assert default > 5 * max(fixed, 1), {"default": default, "fixed": fixed}
