"""Compiled CPU kernel of the blockwise OBNLM filter (numba, parallel over block-centre planes).

One kernel serves both modes: the slice-wise (2D) filter is the 3D filter with block radius,
search radius and local-mean radius 0 along k and a block-centre step of 1 along k; in-plane,
block centres are every 2 voxels in both modes. Arrays are in (k, j, i) order and already
normalised and padded by the caller.

The work is organised per search offset d, so that inner loops run over contiguous voxels and
compile to SIMD instructions:

1. weights: the terms (x(p) - x(p + d))^2 / ((x(p) + x(p + d)) / 2) of every voxel p, summed over
   the block of every centre c of the step-2 grid (separably: along j at full i resolution, then
   along i), give the weight w(c, d) = exp(-distance / h^2), or 0 where the local-mean
   preselection rejects c + d. The weights of a band of centre rows are kept for step 2.
2. aggregation: once every centre's total weight W(c) is known, the blockwise estimates spread back
   over the voxels are, at voxel q, the sum over offsets d of x(q + d) times the sum of
   w(c, d) / W(c) over the centres c whose block covers q. That inner sum is a separable box filter
   of the centre grid. Candidate-block voxels outside the image take the candidate centre's value
   (the public kernel's rule); those few voxels near the faces are added on their own.

This is the same arithmetic as the public kernel's loops in another order: outputs agree to about
1e-12 (tests: the public input/output pair and a plain-loop reference).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Weights kept per band of centre rows (float64 values): bounds step 1's memory per thread.
BAND_VALUES = 2_000_000
#: Compile options: numpy's floating-point error model (no zero-division checks, so loops vectorise)
#: and fused multiply-add.
FAST = dict(cache=True, error_model="numpy", fastmath={"contract"})

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_ROUND = 6755399441055744.0  # 1.5 * 2^52: (x + _ROUND) - _ROUND rounds x to an integer ...
_ROUND_BITS = 0x4338000000000000  # ... whose value is also the low bits of (x + _ROUND)


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


@njit(**FAST)
def _extend(x, margin):
    """Copy of x with `margin` voxels added on each side of every axis, filled by mirroring."""
    nk, nj, ni = x.shape
    ek, ej, ei = margin
    out = np.empty((nk + 2 * ek, nj + 2 * ej, ni + 2 * ei), dtype=x.dtype)
    for k in range(out.shape[0]):
        kk = _mirror(k - ek, nk)
        for j in range(out.shape[1]):
            jj = _mirror(j - ej, nj)
            source = x[kk, jj]
            target = out[k, j]
            middle = target[ei:ei + ni]
            for i in range(ni):
                middle[i] = source[i]
            for i in range(ei):
                target[i] = source[_mirror(i - ei, ni)]
            for i in range(ei + ni, ni + 2 * ei):
                target[i] = source[_mirror(i - ei, ni)]
    return out


@njit(parallel=True, **FAST)
def _local_mean(x, radius):
    """Mean over a (2r+1) box per voxel, out-of-range indices mirrored."""
    nk, nj, ni = x.shape
    rk, rj, ri = radius
    xe = _extend(x, radius)
    count = (2 * rk + 1) * (2 * rj + 1) * (2 * ri + 1)
    out = np.empty_like(x)
    for k in prange(nk):
        for j in range(nj):
            target = out[k, j]
            for i in range(ni):
                target[i] = 0.0
            for u in range(2 * rk + 1):
                for v in range(2 * rj + 1):
                    source = xe[k + u, j + v]
                    for w in range(2 * ri + 1):
                        for i in range(ni):
                            target[i] += source[i + w]
            for i in range(ni):
                target[i] = target[i] / count
    return out


@njit(**FAST)
def _exp_nonpositive(values, out, scratch):
    """out[t] = exp(values[t]) for values[t] <= 0, to about 1e-16 relative, in SIMD-friendly steps
    (scratch: 2 * len(values) float64). Range reduction by ln 2, Taylor polynomial of degree 12,
    the power of 2 built in two halves so that results down to the subnormals stay exact."""
    n = values.shape[0]
    low_half = scratch[:n]
    high_half = scratch[n:2 * n]
    for t in range(n):
        x = values[t]
        x = x if x > -745.5 else -745.5
        kf = (x * _LOG2E + _ROUND) - _ROUND
        r = (x - kf * _LN2_HI) - kf * _LN2_LO
        p = 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        out[t] = p * r + 1.0
        k1 = (kf * 0.5 + _ROUND) - _ROUND
        low_half[t] = k1 + (1023.0 + _ROUND)
        high_half[t] = (kf - k1) + (1023.0 + _ROUND)
    bits = scratch[: 2 * n].view(np.int64)
    for t in range(2 * n):
        bits[t] = (bits[t] - _ROUND_BITS) << 52
    for t in range(n):
        out[t] = out[t] * low_half[t] * high_half[t]


@njit(inline="always", **FAST)
def _candidate_centres(dj, di, r0, r1, nj, ni):
    """(row_lo, row_hi, col_lo, col_hi): the centres (2 row, 2 col) of rows [r0, r1) whose candidate
    (2 row + dj, 2 col + di) lies inside the (nj, ni) image."""
    row_lo = max(r0, (max(0, -dj) + 1) // 2)
    row_hi = min(r1, (nj - dj + 1) // 2)
    col_lo = (max(0, -di) + 1) // 2
    col_hi = min((ni + 1) // 2, (ni - di + 1) // 2)
    return row_lo, row_hi, col_lo, col_hi


@njit(inline="always", **FAST)
def _window_sums(source, first, count, n, out):
    """out[t] = source[first + t] + ... + source[first + t + count - 1] for t < n (count >= 1)."""
    window = source[first:first + n]
    for t in range(n):
        out[t] = window[t]
    for q in range(1, count):
        window = source[first + q:first + q + n]
        for t in range(n):
            out[t] += window[t]


@njit(**FAST)
def _spread(values, row_lo, row_hi, col_lo, col_hi, aj, ai, nj, ni, coarse, even, odd, out):
    """out[u, v] = sum of values[row, col] over the centres (2 row, 2 col) within (aj, ai) of (u, v),
    for the centres [row_lo, row_hi) x [col_lo, col_hi). Returns the range (u0, u1, v0, v1) written,
    clipped to the image (nj, ni). Scratch: coarse (n_cols + 2 ai + 4,), even and odd (n_cols + 1,);
    out has ni + 2 columns."""
    u0 = max(0, 2 * row_lo - aj)
    u1 = min(nj, 2 * (row_hi - 1) + aj + 1)
    v0 = max(0, 2 * col_lo - ai)
    v1 = min(ni, 2 * (col_hi - 1) + ai + 1)
    n = col_hi - col_lo
    pad = ai + 1
    c_start, c_stop = v0 // 2, (v1 + 1) // 2
    m = c_stop - c_start
    even_reach = ai // 2  # v = 2c gathers the centres c - even_reach ... c + even_reach
    odd_reach = (ai - 1) // 2  # v = 2c + 1 gathers c - odd_reach ... c + 1 + odd_reach
    coarse[:] = 0.0
    for u in range(u0, u1):
        # along j, on the centre grid (zero beyond the centres' columns)
        first = max(row_lo, (u - aj + 1) // 2 if u > aj else 0)
        last = min(row_hi - 1, (u + aj) // 2)
        line = coarse[pad:pad + n]
        source = values[first, col_lo:col_hi]
        for t in range(n):
            line[t] = source[t]
        for row in range(first + 1, last + 1):
            source = values[row, col_lo:col_hi]
            for t in range(n):
                line[t] += source[t]
        # along i: the even and the odd voxels of the row, then interleaved
        base = c_start - col_lo + pad
        _window_sums(coarse, base - even_reach, 2 * even_reach + 1, m, even)
        _window_sums(coarse, base - odd_reach, 2 * odd_reach + 2, m, odd)
        target = out[u, 2 * c_start:2 * c_stop]
        for t in range(m):
            target[2 * t] = even[t]
            target[2 * t + 1] = odd[t]
    return u0, u1, v0, v1


@njit(**FAST)
def _filter_centre_plane(x, xe, means, est, ck, search, block, h, ratio_low, ratio_high, band_rows):
    """Filter every block centred on plane k = ck and add its estimates to est. means[pj, pi] is the
    local mean decimated by 2 from (pj, pi) along j and i."""
    nk, nj, ni = x.shape
    mk, mj, mi = search
    ak, aj, ai = block
    ek, ej, ei = ak + mk, aj + mj, ai + mi
    n_rows = (nj + 1) // 2
    n_cols = (ni + 1) // 2
    block_size = (2 * ak + 1) * (2 * aj + 1) * (2 * ai + 1)
    inv_h2 = 1.0 / (h * h)
    k_lo, k_hi = max(0, ck - ak), min(nk, ck + ak + 1)  # planes covered by this plane's blocks

    # Search offsets whose candidate plane lies inside the image (the centre itself excluded).
    n_offsets = 0
    offsets = np.empty(((2 * mk + 1) * (2 * mj + 1) * (2 * mi + 1), 3), dtype=np.int64)
    for dk in range(-mk, mk + 1):
        if ck + dk < 0 or ck + dk >= nk:
            continue
        for dj in range(-mj, mj + 1):
            for di in range(-mi, mi + 1):
                if dk != 0 or dj != 0 or di != 0:
                    offsets[n_offsets, 0] = dk
                    offsets[n_offsets, 1] = dj
                    offsets[n_offsets, 2] = di
                    n_offsets += 1

    weights = np.empty((n_offsets, band_rows, n_cols), dtype=x.dtype)
    weight_sum = np.empty((band_rows, n_cols), dtype=x.dtype)
    weight_max = np.empty((band_rows, n_cols), dtype=x.dtype)
    share = np.empty((n_rows, n_cols), dtype=x.dtype)
    terms = np.empty((nj + 2 * aj, ni + 2 * ai), dtype=x.dtype)
    column_sums = np.empty(ni + 2 * ai + 2, dtype=x.dtype)
    even = np.empty(n_cols + ai + 1, dtype=x.dtype)
    odd = np.empty(n_cols + ai + 1, dtype=x.dtype)
    distance = np.empty(n_cols, dtype=x.dtype)
    weight = np.empty(n_cols, dtype=x.dtype)
    scratch = np.empty(2 * n_cols, dtype=x.dtype)
    coarse = np.empty(n_cols + 2 * ai + 4, dtype=x.dtype)
    even_sums = np.empty(n_cols + 1, dtype=x.dtype)
    odd_sums = np.empty(n_cols + 1, dtype=x.dtype)
    spread = np.empty((nj, ni + 2), dtype=x.dtype)
    own_means = means[0, 0, ck]

    for r0 in range(0, n_rows, band_rows):
        r1 = min(n_rows, r0 + band_rows)
        weight_sum[:] = 0.0
        weight_max[:] = 0.0
        # Step 1: the weights of every (centre, offset) pair of the band.
        for o in range(n_offsets):
            dk, dj, di = offsets[o, 0], offsets[o, 1], offsets[o, 2]
            kc = ck + dk
            weights[o] = 0.0
            row_lo, row_hi, col_lo, col_hi = _candidate_centres(dj, di, r0, r1, nj, ni)
            if row_lo >= row_hi or col_lo >= col_hi:
                continue
            # Terms on the block-covered positions (u = j + aj, v = i + ai).
            v_lo = 2 * col_lo
            width = 2 * (col_hi - 1) + 2 * ai + 1 - v_lo
            a0 = v_lo - ai + ei
            for u in range(2 * row_lo, 2 * (row_hi - 1) + 2 * aj + 1):
                line = terms[u, v_lo:v_lo + width]
                yc = u - aj + ej
                for pk in range(-ak, ak + 1):
                    zc = ck + pk + ek
                    own = xe[zc, yc, a0:a0 + width]
                    other = xe[zc + dk, yc + dj, a0 + di:a0 + di + width]
                    if pk == -ak:
                        for t in range(width):
                            a = own[t]
                            b = other[t]
                            line[t] = (a - b) * (a - b) / ((a + b) * 0.5)
                    else:
                        for t in range(width):
                            a = own[t]
                            b = other[t]
                            line[t] += (a - b) * (a - b) / ((a + b) * 0.5)
            cand_means = means[dj & 1, di & 1, kc]
            for row in range(row_lo, row_hi):
                # Block sums: along j at every i, then along i at the centres.
                top = 2 * row
                sums = column_sums[v_lo:v_lo + width]
                for t in range(width):
                    sums[t] = terms[top, v_lo + t]
                for q in range(1, 2 * aj + 1):
                    line = terms[top + q, v_lo:v_lo + width]
                    for t in range(width):
                        sums[t] += line[t]
                n = col_hi - col_lo
                for t in range(n + ai):  # block sums along i from the even and odd positions
                    even[t] = sums[2 * t]
                for t in range(n + ai - 1):
                    odd[t] = sums[2 * t + 1]
                for t in range(n):
                    distance[t] = even[t]
                for q in range(1, 2 * ai + 1):
                    window = even[q // 2:q // 2 + n] if q % 2 == 0 else odd[q // 2:q // 2 + n]
                    for t in range(n):
                        distance[t] += window[t]
                for t in range(n):
                    distance[t] = -(distance[t] / block_size) * inv_h2
                _exp_nonpositive(distance[:n], weight, scratch)
                mine = own_means[row, col_lo:col_hi]
                theirs = cand_means[row + (dj >> 1), col_lo + (di >> 1):col_hi + (di >> 1)]
                band = row - r0
                out = weights[o, band, col_lo:col_hi]
                total_row = weight_sum[band, col_lo:col_hi]
                max_row = weight_max[band, col_lo:col_hi]
                for t in range(n):
                    m = theirs[t]
                    ratio = mine[t] / m
                    keep = (m > 1e-7) & (ratio > ratio_low) & (ratio < ratio_high)
                    w = weight[t] if keep else 0.0
                    out[t] = w
                    total_row[t] += w
                    max_row[t] = w if w > max_row[t] else max_row[t]

        # Step 2: the centre block, weighted by the best other weight, then every offset.
        for row in range(r0, r1):
            for col in range(n_cols):
                self_weight = weight_max[row - r0, col]
                if self_weight == 0.0:
                    self_weight = 1.0
                total = weight_sum[row - r0, col] + self_weight
                weight_sum[row - r0, col] = 1.0 / total
                share[row, col] = self_weight / total
        u0, u1, v0, v1 = _spread(share, r0, r1, 0, n_cols, aj, ai, nj, ni, coarse, even_sums, odd_sums, spread)
        for pk in range(k_lo, k_hi):
            for u in range(u0, u1):
                line = spread[u, v0:v1]
                source = x[pk, u, v0:v1]
                target = est[pk, u, v0:v1]
                for t in range(v1 - v0):
                    target[t] += line[t] * source[t]
        for o in range(n_offsets):
            dk, dj, di = offsets[o, 0], offsets[o, 1], offsets[o, 2]
            kc = ck + dk
            row_lo, row_hi, col_lo, col_hi = _candidate_centres(dj, di, r0, r1, nj, ni)
            if row_lo >= row_hi or col_lo >= col_hi:
                continue
            for row in range(row_lo, row_hi):
                mine = share[row, col_lo:col_hi]
                w = weights[o, row - r0, col_lo:col_hi]
                inverse = weight_sum[row - r0, col_lo:col_hi]
                for t in range(col_hi - col_lo):
                    mine[t] = w[t] * inverse[t]
            u0, u1, v0, v1 = _spread(share, row_lo, row_hi, col_lo, col_hi, aj, ai, nj, ni, coarse, even_sums, odd_sums, spread)
            # x(q + d) where q + d lies in the image ...
            uu0, uu1 = max(u0, -dj), min(u1, nj - dj)
            vv0, vv1 = max(v0, -di), min(v1, ni - di)
            for pk in range(k_lo, k_hi):
                if pk + dk < 0 or pk + dk >= nk:
                    continue
                for u in range(uu0, uu1):
                    line = spread[u, vv0:vv1]
                    source = x[pk + dk, u + dj, vv0 + di:vv1 + di]
                    target = est[pk, u, vv0:vv1]
                    for t in range(vv1 - vv0):
                        target[t] += line[t] * source[t]
            # ... and the candidate centre's value where it does not (a few voxels near the faces).
            if uu0 == u0 and uu1 == u1 and vv0 == v0 and vv1 == v1 and kc - ak >= 0 and kc + ak < nk:
                continue
            for pk in range(k_lo, k_hi):
                k_out = pk + dk < 0 or pk + dk >= nk
                for u in range(u0, u1):
                    first = max(row_lo, (u - aj + 1) // 2 if u > aj else 0)
                    last = min(row_hi - 1, (u + aj) // 2)
                    whole_row = k_out or u < uu0 or u >= uu1
                    for part in range(2):
                        if whole_row:
                            start, stop = (v0, v1) if part == 0 else (0, 0)
                        else:
                            start, stop = (v0, vv0) if part == 0 else (vv1, v1)
                        for v in range(start, stop):
                            first_col = max(col_lo, (v - ai + 1) // 2 if v > ai else 0)
                            last_col = min(col_hi - 1, (v + ai) // 2)
                            total = 0.0
                            for row in range(first, last + 1):
                                for col in range(first_col, last_col + 1):
                                    total += share[row, col] * x[kc, 2 * row + dj, 2 * col + di]
                            est[pk, u, v] += total


@njit(**FAST)
def _coverage(n, radius, step):
    """Per voxel along one axis: how many block centres (every `step` voxels) cover it."""
    out = np.zeros(n, dtype=np.float64)
    for c in range(0, n, step):
        for q in range(max(0, c - radius), min(n, c + radius + 1)):
            out[q] += 1.0
    return out


@njit(parallel=True, **FAST)
def _decimate(mean):
    """means[pj, pi] = mean[:, pj::2, pi::2], padded at the end by repeating the last row/column."""
    nk, nj, ni = mean.shape
    n_rows, n_cols = (nj + 1) // 2, (ni + 1) // 2
    out = np.empty((2, 2, nk, n_rows + 1, n_cols + 1), dtype=mean.dtype)
    for k in prange(nk):
        for pj in range(2):
            for pi in range(2):
                for row in range(n_rows + 1):
                    j = min(2 * row + pj, nj - 1)
                    for col in range(n_cols + 1):
                        out[pj, pi, k, row, col] = mean[k, j, min(2 * col + pi, ni - 1)]
    return out


@njit(parallel=True, **FAST)
def obnlm_padded(x, search, block, step, mean_radius, h, ratio_low, ratio_high):
    """Blockwise OBNLM on an already padded, offset volume x (k, j, i); returns the estimate.

    search, block, step and mean_radius are (k, j, i) triples; step must be 2 along j and i.
    Centre planes are processed in parallel, in groups whose blocks do not overlap along k, so no
    two threads write one voxel.
    """
    if step[1] != 2 or step[2] != 2:
        raise ValueError("block centres must be every 2 voxels along j and i")
    nk, nj, ni = x.shape
    means = _decimate(_local_mean(x, mean_radius))
    margin = (block[0] + search[0], block[1] + search[1], block[2] + search[2])
    xe = _extend(x, margin)
    est = np.zeros_like(x)
    sk = step[0]
    n_planes = (nk + sk - 1) // sk
    n_groups = (2 * block[0]) // sk + 1
    n_cols = (ni + 1) // 2
    n_offsets = (2 * search[0] + 1) * (2 * search[1] + 1) * (2 * search[2] + 1)
    band_rows = max(1, min((nj + 1) // 2, BAND_VALUES // (n_offsets * n_cols)))
    for group in range(n_groups):
        n_in_group = (n_planes - group + n_groups - 1) // n_groups
        for g in prange(n_in_group):
            ck = (group + g * n_groups) * sk
            _filter_centre_plane(x, xe, means, est, ck, search, block, h, ratio_low, ratio_high, band_rows)
    cover_k = _coverage(nk, block[0], sk)
    cover_j = _coverage(nj, block[1], 2)
    cover_i = _coverage(ni, block[2], 2)
    out = np.empty_like(x)
    for k in prange(nk):
        for j in range(nj):
            for i in range(ni):
                count = cover_k[k] * cover_j[j] * cover_i[i]
                out[k, j, i] = est[k, j, i] / count if count > 0 else x[k, j, i]
    return out
