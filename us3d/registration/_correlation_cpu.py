"""Compiled CPU kernel of the registration network's cost volumes (numba, parallel over slices).

`us3d.registration.voxelmorph.correlation` computes, for every offset within a radius, the dot product
of the fixed features at x and the moving features at x + offset. Written with torch operations, each
of the about 800 offsets of the bundled network writes a product the size of the features and reads
it back to sum it; on the CPU those passes through memory were about half of the network's time. This
kernel reads each voxel's feature vector once per offset from the cache and writes only the scores.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

FAST = dict(cache=True, error_model="numpy", fastmath={"contract"})


@njit(parallel=True, **FAST)
def correlate(fixed: np.ndarray, moving: np.ndarray, radius: np.ndarray, out: np.ndarray) -> None:
    """out[k, j, i, o] = sum over c of fixed[k, j, i, c] * moving[(k, j, i) + offset o, c], zero where
    the offset leaves the volume; features channels-last (k, j, i, c), offsets within `radius` (k, j, i)
    in k-major order, as `voxelmorph.correlation` stacks them."""
    size_k, size_j, size_i, channels = fixed.shape
    rk, rj, ri = radius[0], radius[1], radius[2]
    for k in prange(size_k):
        for j in range(size_j):
            for i in range(size_i):
                o = 0
                for dk in range(-rk, rk + 1):
                    mk = k + dk
                    for dj in range(-rj, rj + 1):
                        mj = j + dj
                        for di in range(-ri, ri + 1):
                            mi = i + di
                            total = np.float32(0.0)
                            if 0 <= mk < size_k and 0 <= mj < size_j and 0 <= mi < size_i:
                                for c in range(channels):
                                    total += fixed[k, j, i, c] * moving[mk, mj, mi, c]
                            out[k, j, i, o] = total
                            o += 1
