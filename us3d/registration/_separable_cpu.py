"""Compiled CPU kernel of a separable Gaussian blur (numba, parallel over slices): the taps are applied
directly, where `us3d.registration.separable.apply` multiplies by a dense (n, n) matrix per axis, so a
blur of sigma 2 costs about 13 instead of n multiply-adds per voxel and axis. `separable.gaussian`
calls it for float32 tensors on the CPU; the tests compare it with the matrix products.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

FAST = dict(cache=True, error_model="numpy", fastmath={"contract"})


@njit(inline="always")
def _source(position: int, tap: int, radius: int, n: int, replicate: bool) -> int:
    """The sample that tap `tap` of a kernel of `radius` centred on `position` reads along an axis of n:
    clamped to the edge (`replicate`), or -1 outside (zeros there)."""
    source = position + tap - radius
    if 0 <= source < n:
        return source
    return min(max(source, 0), n - 1) if replicate else -1


@njit(parallel=True, **FAST)
def blur(volume: np.ndarray, taps: np.ndarray, replicate: bool, out: np.ndarray) -> None:
    """out (n, k, j, i) = volume (n, k, j, i) convolved with `taps` (2 r + 1, centred) along k, j and i;
    outside each axis the edge values (`replicate`) or zeros. `out` must not be `volume`."""
    count, size_k, size_j, size_i = volume.shape
    radius = (taps.shape[0] - 1) // 2
    along_i = np.empty_like(volume)
    along_j = np.empty_like(volume)
    for plane in prange(count * size_k):
        n, k = plane // size_k, plane % size_k
        for j in range(size_j):
            for i in range(size_i):
                total = np.float32(0.0)
                for t in range(taps.shape[0]):
                    source = _source(i, t, radius, size_i, replicate)
                    if source >= 0:
                        total += taps[t] * volume[n, k, j, source]
                along_i[n, k, j, i] = total
        for j in range(size_j):
            for i in range(size_i):
                along_j[n, k, j, i] = 0.0
            for t in range(taps.shape[0]):
                source = _source(j, t, radius, size_j, replicate)
                if source < 0:
                    continue
                for i in range(size_i):
                    along_j[n, k, j, i] += taps[t] * along_i[n, k, source, i]
    for plane in prange(count * size_k):
        n, k = plane // size_k, plane % size_k
        for j in range(size_j):
            for i in range(size_i):
                out[n, k, j, i] = 0.0
        for t in range(taps.shape[0]):
            source = _source(k, t, radius, size_k, replicate)
            if source < 0:
                continue
            for j in range(size_j):
                for i in range(size_i):
                    out[n, k, j, i] += taps[t] * along_j[n, source, j, i]
