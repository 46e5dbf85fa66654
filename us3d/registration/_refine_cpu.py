"""Compiled CPU kernels of the refinement (numba, parallel over slices): the trilinear warp and the
linearised image term with its gradient.

`us3d.registration.refine._warp` calls the warp for float32 volumes on the CPU and gathers with torch
elsewhere (CUDA); both give what `us3d.registration.voxelmorph.transform` (grid_sample) gives. On a
256x256x128 frame with its three gradient channels the torch version streams every channel through
memory about fifteen times (eight gathers and seven interpolations) and takes about 1.3 s; this
kernel reads each cell's corners once.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

FAST = dict(cache=True, error_model="numpy", fastmath={"contract"})


@njit(inline="always")
def _cell(position: float, n: int) -> tuple[int, int, float]:
    """(low corner, high corner, fraction) of a position clamped to [0, n - 1] on an axis of n samples."""
    position = min(max(position, 0.0), n - 1.0)
    low = min(int(np.floor(position)), max(n - 2, 0))
    return low, min(low + 1, n - 1), position - low


@njit(parallel=True, **FAST)
def warp_trilinear(volume: np.ndarray, displacement: np.ndarray, out: np.ndarray) -> None:
    """out[c, k, j, i] = volume[c] at (k, j, i) + displacement[:, k, j, i], trilinear, edge values
    outside; volume and out (c, k, j, i), displacement (3, k, j, i) in voxels, channels (k, j, i)."""
    channels, size_k, size_j, size_i = volume.shape
    for k in prange(size_k):
        for j in range(size_j):
            for i in range(size_i):
                k0, k1, fk = _cell(k + displacement[0, k, j, i], size_k)
                j0, j1, fj = _cell(j + displacement[1, k, j, i], size_j)
                i0, i1, fi = _cell(i + displacement[2, k, j, i], size_i)
                for c in range(channels):
                    v = volume[c]
                    low = ((v[k0, j0, i0] * (1 - fi) + v[k0, j0, i1] * fi) * (1 - fj)
                           + (v[k0, j1, i0] * (1 - fi) + v[k0, j1, i1] * fi) * fj)
                    high = ((v[k1, j0, i0] * (1 - fi) + v[k1, j0, i1] * fi) * (1 - fj)
                            + (v[k1, j1, i0] * (1 - fi) + v[k1, j1, i1] * fi) * fj)
                    out[c, k, j, i] = low * (1 - fk) + high * fk


@njit(parallel=True, **FAST)
def linearised_term(change: np.ndarray, difference: np.ndarray, slopes: np.ndarray, gradient: np.ndarray) -> float:
    """sum over voxels of q^2, q = difference + slopes . change, and its gradient 2 q slopes with
    respect to change, in one pass; change, slopes and gradient (3, k, j, i), difference (k, j, i)."""
    size_k, size_j, size_i = difference.shape
    total = 0.0
    for k in prange(size_k):
        for j in range(size_j):
            for i in range(size_i):
                q = (difference[k, j, i] + slopes[0, k, j, i] * change[0, k, j, i]
                     + slopes[1, k, j, i] * change[1, k, j, i] + slopes[2, k, j, i] * change[2, k, j, i])
                total += q * q
                for c in range(3):
                    gradient[c, k, j, i] = 2 * q * slopes[c, k, j, i]
    return total
