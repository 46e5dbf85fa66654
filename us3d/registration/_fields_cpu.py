"""Compiled CPU kernel of `us3d.registration.fields.warp_voxels` (numba, parallel over slices): a
volume warped by a voxel displacement on its own grid, as SimpleITK's linear `Resample` warps it
(`fields.warp`) without the field's conversion to mm and back, in one pass over the volume.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from us3d.registration._refine_cpu import FAST, _cell
from us3d.registration._transform_cpu import trilinear


@njit(inline="always")
def _nearest(position: float, n: int) -> int:
    """ITK's nearest voxel of a continuous index (halves rounded up), clamped to [0, n - 1]."""
    return min(max(int(np.floor(position + 0.5)), 0), n - 1)


@njit(parallel=True, **FAST)
def warp(volume: np.ndarray, displacement: np.ndarray, extrapolate: bool, out: np.ndarray) -> None:
    """out (k, j, i) = volume (k, j, i) at x + displacement(x), displacement (3, k, j, i) in voxels,
    channels (k, j, i): trilinear, the edge values within half a voxel outside the grid (ITK's
    buffer); beyond it 0, or with `extrapolate` the nearest voxel's value (ITK's nearest-neighbour
    extrapolator)."""
    size_k, size_j, size_i = volume.shape
    last = volume.reshape((size_k, size_j, size_i, 1))  # the spatial transformer's channels-last layout
    for k in prange(size_k):
        for j in range(size_j):
            for i in range(size_i):
                pk = k + displacement[0, k, j, i]
                pj = j + displacement[1, k, j, i]
                pi = i + displacement[2, k, j, i]
                if not (-0.5 <= pk < size_k - 0.5 and -0.5 <= pj < size_j - 0.5 and -0.5 <= pi < size_i - 0.5):
                    if extrapolate:
                        out[k, j, i] = volume[_nearest(pk, size_k), _nearest(pj, size_j), _nearest(pi, size_i)]
                    else:
                        out[k, j, i] = 0.0
                    continue
                k0, k1, fk = _cell(pk, size_k)
                j0, j1, fj = _cell(pj, size_j)
                i0, i1, fi = _cell(pi, size_i)
                out[k, j, i] = trilinear(last, k0, k1, fk, j0, j1, fj, i0, i1, fi, 0)
