"""The C allocator told to keep large freed blocks for reuse (glibc only; elsewhere nothing).

Why: PyTorch on a CPU allocates every activation and gradient with malloc. glibc serves blocks
above its mmap threshold (128 KB at first, raised as blocks are freed, at most 32 MB) with a fresh
mmap and gives them back to the system when freed; it also trims the top of the heap once more
than twice that threshold is free. A backward pass frees and reallocates tensors of several MB
each step, and every page of each new block is then faulted in again by the kernel. Measured on
the reference machine: montages of 64 fc units spent 7.8 s of system time in 19 s (4.4 M page
faults); with the thresholds fixed (blocks up to 32 MB from the heap, 256 MB of free heap kept)
0.7 s and 12.5 -> 11.2 s in all; benchmarks/bench_optimize.py (ours and Lucent's runs): 18 -> 8 s
of system time. How much glibc's defaults cost varies from run to run of the same work (their
threshold adapts to the order in which blocks are freed): three forward and backward passes at 4
images faulted 0 to 44,000 pages between runs; with the setting 1,900-4,700, every run.

What it costs: up to 256 MB of freed memory stays with the process instead of going back to the
system (the peak, what a machine must have, does not change). Blocks above 32 MB (glibc's limit
for the threshold) are still mapped and unmapped each time, which is one reason montages go
backward 4 images at a time (atlas/patches.py)."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 256 * 1024 * 1024

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; True where they were set (Linux with glibc)."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt  # glibc's; musl has none
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
