"""Plain-loop OBNLM written straight from the method's description, for testing the fast kernels.

Slow on purpose (one block pair at a time, no box sums); use on tiny volumes only.
"""

import numpy as np


def _mirror(index, size):
    index = np.abs(index)
    return np.where(index >= size, 2 * size - 1 - index, index)


def blockwise_obnlm(x, search, block, step, mean_radius, h, low=0.8, high=1.25):
    """OBNLM on a padded, offset volume x (k, j, i); radii and steps per axis."""
    shape = np.array(x.shape)
    block = np.array(block)

    def box(centre, radius):
        axes = [_mirror(np.arange(c - r, c + r + 1), n) for c, r, n in zip(centre, radius, shape)]
        return x[np.ix_(*axes)]

    mean = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        mean[idx] = box(idx, mean_radius).mean()

    est, lab = np.zeros_like(x), np.zeros_like(x)
    offsets = [o for o in np.ndindex(*(2 * np.array(search) + 1))]
    for centre in np.ndindex(*[(n + s - 1) // s for n, s in zip(shape, step)]):
        c = np.array(centre) * np.array(step)
        own = box(c, block)
        acc, wsum, wmax = np.zeros_like(own), 0.0, 0.0
        for o in offsets:
            d = np.array(o) - np.array(search)
            if not d.any():
                continue
            cand = c + d
            if (cand < 0).any() or (cand >= shape).any():
                continue
            m_c, m_d = mean[tuple(c)], mean[tuple(cand)]
            if not (m_d > 1e-7 and low < m_c / m_d < high):
                continue
            other = box(cand, block)
            distance = np.mean((own - other) ** 2 / ((own + other) / 2))
            w = np.exp(-distance / h ** 2)
            wmax, wsum = max(wmax, w), wsum + w
            # Candidate-block voxels outside the volume take the candidate centre's value.
            grids = np.meshgrid(*[np.arange(p - r, p + r + 1) for p, r in zip(cand, block)], indexing="ij")
            outside = np.zeros(other.shape, bool)
            for g, n in zip(grids, shape):
                outside |= (g < 0) | (g >= n)
            acc += w * np.where(outside, x[tuple(cand)], other)
        wmax = wmax if wmax > 0 else 1.0
        estimate = (acc + wmax * own) / (wsum + wmax)
        for p in np.ndindex(*own.shape):
            q = c + np.array(p) - block
            if (q >= 0).all() and (q < shape).all():
                est[tuple(q)] += estimate[p]
                lab[tuple(q)] += 1
    return np.where(lab > 0, est / np.maximum(lab, 1), x)
