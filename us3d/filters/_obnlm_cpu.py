"""Compiled CPU kernel of the blockwise OBNLM filter (numba, parallel over block-centre planes).

One kernel serves both modes: the slice-wise (2D) filter is the 3D filter with block radius,
search radius and local-mean radius 0 along k and a block-centre step of 1 along k.
Arrays are in (k, j, i) order and already normalised and padded by the caller.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(inline="always", cache=True)
def _mirror(index: int, size: int) -> int:
    """The public kernel's mirror rule: i -> |i| below 0, i -> 2N-1-i at or past N."""
    if index < 0:
        index = -index
    if index >= size:
        index = 2 * size - 1 - index
    # Clamp for tiny images where one reflection is not enough (never reached for usual sizes).
    if index < 0:
        index = 0
    if index >= size:
        index = size - 1
    return index


@njit(parallel=True, cache=True)
def _local_mean(x, radius):
    """Mean over a (2r+1) box per voxel, out-of-range indices mirrored."""
    nk, nj, ni = x.shape
    rk, rj, ri = radius
    count = (2 * rk + 1) * (2 * rj + 1) * (2 * ri + 1)
    out = np.empty_like(x)
    for k in prange(nk):
        for j in range(nj):
            for i in range(ni):
                total = 0.0
                for u in range(-rk, rk + 1):
                    kk = _mirror(k + u, nk)
                    for v in range(-rj, rj + 1):
                        jj = _mirror(j + v, nj)
                        for w in range(-ri, ri + 1):
                            total += x[kk, jj, _mirror(i + w, ni)]
                out[k, j, i] = total / count
    return out


@njit(cache=True)
def _extend(x, margin):
    """Copy of x with `margin` voxels added on each side of every axis, filled by mirroring."""
    nk, nj, ni = x.shape
    ek, ej, ei = margin
    out = np.empty((nk + 2 * ek, nj + 2 * ej, ni + 2 * ei), dtype=x.dtype)
    for k in range(out.shape[0]):
        kk = _mirror(k - ek, nk)
        for j in range(out.shape[1]):
            jj = _mirror(j - ej, nj)
            for i in range(out.shape[2]):
                out[k, j, i] = x[kk, jj, _mirror(i - ei, ni)]
    return out


@njit(cache=True)
def _filter_centre_plane(x, xe, mean, est, lab, ck, search, block, step, h, ratio_low, ratio_high):
    """Filter every block centred on plane k = ck and add its estimates to est/lab."""
    nk, nj, ni = x.shape
    mk, mj, mi = search
    ak, aj, ai = block
    sj, si = step[1], step[2]
    ek, ej, ei = ak + mk, aj + mj, ai + mi
    n_rows = (nj + sj - 1) // sj
    n_cols = (ni + si - 1) // si
    block_size = (2 * ak + 1) * (2 * aj + 1) * (2 * ai + 1)
    inv_h2 = 1.0 / (h * h)

    acc = np.zeros((n_rows * n_cols, block_size), dtype=x.dtype)
    weight_sum = np.zeros(n_rows * n_cols, dtype=x.dtype)
    weight_max = np.zeros(n_rows * n_cols, dtype=x.dtype)
    # Per-offset work arrays: distance terms on the block-covered plane, then box sums.
    terms = np.empty((nj + 2 * aj, ni + 2 * ai), dtype=x.dtype)
    row_sums = np.empty((nj + 2 * aj, n_cols), dtype=x.dtype)

    for dk in range(-mk, mk + 1):
        kc = ck + dk
        if kc < 0 or kc >= nk:
            continue
        for dj in range(-mj, mj + 1):
            # Centre rows whose candidate row lies inside the image.
            row_lo = (max(0, -dj) + sj - 1) // sj
            row_hi = min(n_rows, (nj - dj + sj - 1) // sj)
            if row_lo >= row_hi:
                continue
            for di in range(-mi, mi + 1):
                if dk == 0 and dj == 0 and di == 0:
                    continue
                col_lo = (max(0, -di) + si - 1) // si
                col_hi = min(n_cols, (ni - di + si - 1) // si)
                if col_lo >= col_hi:
                    continue
                # Terms (x - y)^2 / ((x + y) / 2), summed over the block's k-extent, for every
                # in-plane position covered by a block of a valid centre (index u = j + aj).
                u_lo = row_lo * sj
                u_hi = (row_hi - 1) * sj + 2 * aj + 1
                v_lo = col_lo * si
                v_hi = (col_hi - 1) * si + 2 * ai + 1
                for u in range(u_lo, u_hi):
                    for v in range(v_lo, v_hi):
                        terms[u, v] = 0.0
                    for pk in range(-ak, ak + 1):
                        zc = ck + pk + ek
                        zd = zc + dk
                        yc = u - aj + ej
                        yd = yc + dj
                        for v in range(v_lo, v_hi):
                            xc = v - ai + ei
                            a = xe[zc, yc, xc]
                            b = xe[zd, yd, xc + di]
                            diff = a - b
                            terms[u, v] += diff * diff / ((a + b) * 0.5)
                    for col in range(col_lo, col_hi):
                        total = 0.0
                        v0 = col * si
                        for q in range(2 * ai + 1):
                            total += terms[u, v0 + q]
                        row_sums[u, col] = total
                for row in range(row_lo, row_hi):
                    cj = row * sj
                    cand_j = cj + dj
                    for col in range(col_lo, col_hi):
                        ci = col * si
                        cand_i = ci + di
                        cand_mean = mean[kc, cand_j, cand_i]
                        if not (cand_mean > 1e-7):
                            continue
                        ratio = mean[ck, cj, ci] / cand_mean
                        if not (ratio > ratio_low and ratio < ratio_high):
                            continue
                        distance = 0.0
                        for q in range(2 * aj + 1):
                            distance += row_sums[cj + q, col]
                        weight = np.exp(-(distance / block_size) * inv_h2)
                        centre = row * n_cols + col
                        if weight > weight_max[centre]:
                            weight_max[centre] = weight
                        weight_sum[centre] += weight
                        inside = (
                            kc - ak >= 0 and kc + ak < nk
                            and cand_j - aj >= 0 and cand_j + aj < nj
                            and cand_i - ai >= 0 and cand_i + ai < ni
                        )
                        p = 0
                        if inside:
                            for pk in range(kc - ak, kc + ak + 1):
                                for pj in range(cand_j - aj, cand_j + aj + 1):
                                    for pi in range(cand_i - ai, cand_i + ai + 1):
                                        acc[centre, p] += weight * x[pk, pj, pi]
                                        p += 1
                        else:
                            # Pixels outside the image take the candidate block's centre value.
                            fill = x[kc, cand_j, cand_i]
                            for pk in range(kc - ak, kc + ak + 1):
                                for pj in range(cand_j - aj, cand_j + aj + 1):
                                    for pi in range(cand_i - ai, cand_i + ai + 1):
                                        value = fill
                                        if 0 <= pk < nk and 0 <= pj < nj and 0 <= pi < ni:
                                            value = x[pk, pj, pi]
                                        acc[centre, p] += weight * value
                                        p += 1

    # Centre block weighted by the best other weight, then the block estimate is spread out.
    for row in range(n_rows):
        cj = row * sj
        for col in range(n_cols):
            ci = col * si
            centre = row * n_cols + col
            self_weight = weight_max[centre]
            if self_weight == 0.0:
                self_weight = 1.0
            total_weight = weight_sum[centre] + self_weight
            p = 0
            for pk in range(ck - ak, ck + ak + 1):
                for pj in range(cj - aj, cj + aj + 1):
                    for pi in range(ci - ai, ci + ai + 1):
                        if 0 <= pk < nk and 0 <= pj < nj and 0 <= pi < ni:
                            value = acc[centre, p] + self_weight * x[pk, pj, pi]
                            est[pk, pj, pi] += value / total_weight
                            lab[pk, pj, pi] += 1.0
                        p += 1


@njit(parallel=True, cache=True)
def obnlm_padded(x, search, block, step, mean_radius, h, ratio_low, ratio_high):
    """Blockwise OBNLM on an already padded, offset volume x (k, j, i); returns the estimate.

    search, block, step and mean_radius are (k, j, i) triples. Centre planes are processed in
    parallel, in groups whose blocks do not overlap along k, so no two threads write one voxel.
    """
    nk = x.shape[0]
    mean = _local_mean(x, mean_radius)
    margin = (block[0] + search[0], block[1] + search[1], block[2] + search[2])
    xe = _extend(x, margin)
    est = np.zeros_like(x)
    lab = np.zeros_like(x)
    sk = step[0]
    n_planes = (nk + sk - 1) // sk
    n_groups = (2 * block[0]) // sk + 1
    for group in range(n_groups):
        n_in_group = (n_planes - group + n_groups - 1) // n_groups
        for g in prange(n_in_group):
            ck = (group + g * n_groups) * sk
            _filter_centre_plane(x, xe, mean, est, lab, ck, search, block, step, h, ratio_low, ratio_high)
    out = np.empty_like(x)
    for k in prange(nk):
        for j in range(x.shape[1]):
            for i in range(x.shape[2]):
                if lab[k, j, i] > 0:
                    out[k, j, i] = est[k, j, i] / lab[k, j, i]
                else:
                    out[k, j, i] = x[k, j, i]
    return out
