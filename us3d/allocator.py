"""How the process's C allocator hands out the memory of large CPU tensors (`reuse_freed_memory`)."""

from __future__ import annotations

import ctypes
import sys


def reuse_freed_memory(limit: int = 1 << 30) -> bool:
    """Have glibc's malloc serve blocks of up to `limit` bytes from its heap, and keep up to `limit`
    bytes of freed memory for reuse (its M_MMAP_THRESHOLD and M_TRIM_THRESHOLD).

    By default every block over 32 MiB (any large tensor) is a fresh mapping, handed back to the
    system when it is freed, so each tensor of a large frame costs page faults that the kernel
    zero-fills; on a 2-core machine that was much of a 256x256x128 frame's time (the README's 4D
    figures: benchmarks/bench_4d.py runs the CLI, which calls this, and benchmarks/bench_device.py
    runs in-process without it). The process then keeps up to `limit` bytes of freed memory.

    Process-wide: the `us3d` CLI, and so Slicer's background runs, call it first; a batch script
    calls it once for the same effect. Returns False, changing nothing, where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mmap_threshold, trim_threshold = -3, -1  # glibc's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    return bool(mallopt(mmap_threshold, limit)) and bool(mallopt(trim_threshold, limit))
