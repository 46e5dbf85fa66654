"""Compiled CPU kernels of the refinement (numba, parallel over slices): the image term's
linearisation about the current displacement (the trilinear warp of the moving volume and its
gradient, the inside mask), the linearised term with its gradient on the control grid, and the
Jacobian determinant. `us3d.registration.refine` calls them for float32 tensors on the CPU and does
the same in torch operations elsewhere (CUDA); the tests compare both. Each reads the volumes once per
call where the torch composition streams them through memory about ten times.
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


@njit(inline="always")
def _plane(control: np.ndarray, first: int, fraction: float, plane: np.ndarray) -> None:
    """plane (3, jc, ic) = control (3, kc, jc, ic) interpolated between planes first and first + 1."""
    for c in range(3):
        for a in range(control.shape[2]):
            for b in range(control.shape[3]):
                plane[c, a, b] = control[c, first, a, b] + fraction * (control[c, first + 1, a, b]
                                                                       - control[c, first, a, b])


@njit(inline="always")
def _row(plane: np.ndarray, first: int, fraction: float, row: np.ndarray) -> None:
    """row (3, ic) = plane (3, jc, ic) interpolated between rows first and first + 1."""
    for c in range(3):
        for b in range(plane.shape[2]):
            row[c, b] = plane[c, first, b] + fraction * (plane[c, first + 1, b] - plane[c, first, b])


@njit(parallel=True, **FAST)
def linearise(start: np.ndarray, control: np.ndarray, volume: np.ndarray, fixed: np.ndarray,
              low_k: np.ndarray, weight_k: np.ndarray, low_j: np.ndarray, weight_j: np.ndarray,
              low_i: np.ndarray, weight_i: np.ndarray, difference: np.ndarray, slopes: np.ndarray) -> float:
    """The image term's first-order expansion about the displacement u = start + the control grid
    interpolated onto the dense grid (as `linearised_term_on_control` does), in one pass: where
    x + u(x) lies inside the volume, difference = moving(x + u) - fixed and slopes = the moving
    volume's gradient there (trilinear, edge values outside, as `refine._warp`), zero elsewhere.

    start (3, k, j, i), control (3, kc, jc, ic), volume (4, k, j, i): the moving volume and its
    gradient along k, j, i; fixed (k, j, i); out: difference (k, j, i), slopes (3, k, j, i). Returns
    the number of voxels whose source lies inside."""
    size_k, size_j, size_i = fixed.shape
    control_j, control_i = control.shape[2], control.shape[3]
    counts = np.zeros(size_k)
    for k in prange(size_k):
        plane = np.empty((3, control_j, control_i), dtype=np.float32)
        row = np.empty((3, control_i), dtype=np.float32)
        _plane(control, low_k[k], weight_k[k], plane)
        counts[k] = 0.0
        for j in range(size_j):
            _row(plane, low_j[j], weight_j[j], row)
            for i in range(size_i):
                li, wi = low_i[i], weight_i[i]
                pk = k + start[0, k, j, i] + row[0, li] + wi * (row[0, li + 1] - row[0, li])
                pj = j + start[1, k, j, i] + row[1, li] + wi * (row[1, li + 1] - row[1, li])
                pi = i + start[2, k, j, i] + row[2, li] + wi * (row[2, li + 1] - row[2, li])
                if 0 <= pk <= size_k - 1 and 0 <= pj <= size_j - 1 and 0 <= pi <= size_i - 1:
                    counts[k] += 1.0
                    k0, k1, fk = _cell(pk, size_k)
                    j0, j1, fj = _cell(pj, size_j)
                    i0, i1, fi = _cell(pi, size_i)
                    for c in range(4):
                        v = volume[c]
                        low = ((v[k0, j0, i0] * (1 - fi) + v[k0, j0, i1] * fi) * (1 - fj)
                               + (v[k0, j1, i0] * (1 - fi) + v[k0, j1, i1] * fi) * fj)
                        high = ((v[k1, j0, i0] * (1 - fi) + v[k1, j0, i1] * fi) * (1 - fj)
                                + (v[k1, j1, i0] * (1 - fi) + v[k1, j1, i1] * fi) * fj)
                        value = low * (1 - fk) + high * fk
                        if c == 0:
                            difference[k, j, i] = value - fixed[k, j, i]
                        else:
                            slopes[c - 1, k, j, i] = value
                else:
                    difference[k, j, i] = 0.0
                    for c in range(3):
                        slopes[c, k, j, i] = 0.0
    return counts.sum()


@njit(parallel=True, **FAST)
def linearised_term_on_control(change: np.ndarray, difference: np.ndarray, slopes: np.ndarray,
                               low_k: np.ndarray, weight_k: np.ndarray, low_j: np.ndarray, weight_j: np.ndarray,
                               low_i: np.ndarray, weight_i: np.ndarray, planes: np.ndarray) -> float:
    """The sum over voxels of q^2, q = difference + slopes . change, for a change given on the control
    grid and interpolated onto the dense grid on the fly, with its gradient with respect to the control
    grid; one pass over the dense volume, and the dense change is never formed.

    change (3, kc, jc, ic), difference (k, j, i), slopes (3, k, j, i); along each axis, dense sample n
    lies between control points low[n] and low[n] + 1, with `weight[n]` on the second (the rows of
    `us3d.registration.separable.linear_matrix`). planes (k, 2, 3, jc, ic): out, each dense slice's
    share of the gradient on control planes low_k[k] and low_k[k] + 1 (`gather_planes` sums them).
    Returns the sum of q^2."""
    size_k, size_j, size_i = difference.shape
    control_j, control_i = change.shape[2], change.shape[3]
    totals = np.zeros(size_k)
    for k in prange(size_k):
        lk, wk = low_k[k], weight_k[k]
        plane = np.empty((3, control_j, control_i), dtype=np.float32)  # change interpolated along k
        _plane(change, lk, wk, plane)
        gradient_plane = np.zeros((3, control_j, control_i), dtype=np.float32)
        row = np.empty((3, control_i), dtype=np.float32)
        gradient_row = np.empty((3, control_i), dtype=np.float32)
        total = 0.0
        for j in range(size_j):
            lj, wj = low_j[j], weight_j[j]
            _row(plane, lj, wj, row)
            for c in range(3):
                for b in range(control_i):
                    gradient_row[c, b] = 0.0
            for i in range(size_i):
                li, wi = low_i[i], weight_i[i]
                q = difference[k, j, i]
                for c in range(3):
                    q += slopes[c, k, j, i] * (row[c, li] + wi * (row[c, li + 1] - row[c, li]))
                total += q * q
                for c in range(3):
                    s = 2 * q * slopes[c, k, j, i]
                    gradient_row[c, li] += s * (1 - wi)
                    gradient_row[c, li + 1] += s * wi
            for c in range(3):
                for b in range(control_i):
                    gradient_plane[c, lj, b] += gradient_row[c, b] * (1 - wj)
                    gradient_plane[c, lj + 1, b] += gradient_row[c, b] * wj
        for c in range(3):
            for a in range(control_j):
                for b in range(control_i):
                    planes[k, 0, c, a, b] = gradient_plane[c, a, b] * (1 - wk)
                    planes[k, 1, c, a, b] = gradient_plane[c, a, b] * wk
        totals[k] = total
    return totals.sum()


@njit(**FAST)
def gather_planes(planes: np.ndarray, low_k: np.ndarray, gradient: np.ndarray) -> None:
    """gradient (3, kc, jc, ic) = the sum of `linearised_term_on_control`'s per-slice planes."""
    gradient[:] = 0.0
    for k in range(planes.shape[0]):
        gradient[:, low_k[k]] += planes[k, 0]
        gradient[:, low_k[k] + 1] += planes[k, 1]


@njit(parallel=True, **FAST)
def jacobian_determinant(displacement: np.ndarray, out: np.ndarray) -> None:
    """out (k, j, i) = det(I + grad u) for a displacement (3, k, j, i) in voxels, channels (k, j, i):
    central differences with the edge values repeated outside (what `refine.jacobian_determinant`
    computes with torch)."""
    size_k, size_j, size_i = out.shape
    for k in prange(size_k):
        g = np.empty((3, 3), dtype=np.float32)  # g[c, a] = d u_c / d x_a
        kb, ka = max(k - 1, 0), min(k + 1, size_k - 1)
        for j in range(size_j):
            jb, ja = max(j - 1, 0), min(j + 1, size_j - 1)
            for i in range(size_i):
                ib, ia = max(i - 1, 0), min(i + 1, size_i - 1)
                for c in range(3):
                    u = displacement[c]
                    g[c, 0] = (u[ka, j, i] - u[kb, j, i]) * 0.5
                    g[c, 1] = (u[k, ja, i] - u[k, jb, i]) * 0.5
                    g[c, 2] = (u[k, j, ia] - u[k, j, ib]) * 0.5
                g[0, 0] += 1.0
                g[1, 1] += 1.0
                g[2, 2] += 1.0
                out[k, j, i] = (g[0, 0] * (g[1, 1] * g[2, 2] - g[1, 2] * g[2, 1])
                                - g[0, 1] * (g[1, 0] * g[2, 2] - g[1, 2] * g[2, 0])
                                + g[0, 2] * (g[1, 0] * g[2, 1] - g[1, 1] * g[2, 0]))


@njit(**FAST)
def control_terms(control: np.ndarray, start: np.ndarray, to_mm: np.ndarray, control_mm: np.ndarray,
                  to_control: np.ndarray, regularisation_weight: float, sliding: bool, folding_weight: float,
                  gradient: np.ndarray) -> float:
    """The refinement's terms on the control grid and their gradient, in one pass (what
    `refine._penalty` and `refine._folding` compute with torch, about sixty small operations and
    their backward):

        regularisation_weight * sum over axes a of mean(sqrt(|D_a(control * to_mm)|^2 / control_mm[a]^2 + 1e-4))
        + folding_weight * mean(max(0, 0.1 - det(I + D(start + control * to_control)))^2)

    (with `sliding` False the squared gradient replaces the square root). D_a: forward differences
    along axis a; the determinant over the cells of the grid, forward differences from each cell's
    first corner. control, start (3, kc, jc, ic); to_mm, to_control (3,) per channel; control_mm (3,)
    per axis; gradient (3, kc, jc, ic): out, the gradient with respect to control. Returns the value."""
    sizes = control.shape[1:]
    gradient[:] = 0.0
    total = 0.0
    for axis in range(3):
        if sizes[axis] < 2:
            continue
        step_k, step_j, step_i = int(axis == 0), int(axis == 1), int(axis == 2)
        count = (sizes[0] - step_k) * (sizes[1] - step_j) * (sizes[2] - step_i)
        scale = regularisation_weight / count
        for k in range(sizes[0] - step_k):
            for j in range(sizes[1] - step_j):
                for i in range(sizes[2] - step_i):
                    d0 = (control[0, k + step_k, j + step_j, i + step_i] - control[0, k, j, i]) * to_mm[0] / control_mm[axis]
                    d1 = (control[1, k + step_k, j + step_j, i + step_i] - control[1, k, j, i]) * to_mm[1] / control_mm[axis]
                    d2 = (control[2, k + step_k, j + step_j, i + step_i] - control[2, k, j, i]) * to_mm[2] / control_mm[axis]
                    squared = d0 * d0 + d1 * d1 + d2 * d2
                    if sliding:
                        root = np.sqrt(squared + 1e-4)
                        total += scale * root
                        factor = scale / root
                    else:
                        total += scale * squared
                        factor = 2 * scale
                    for c in range(3):
                        d = d0 if c == 0 else d1 if c == 1 else d2
                        g = factor * d * to_mm[c] / control_mm[axis]
                        gradient[c, k + step_k, j + step_j, i + step_i] += g
                        gradient[c, k, j, i] -= g
    if folding_weight > 0 and min(sizes[0], sizes[1], sizes[2]) >= 2:
        scale = folding_weight / ((sizes[0] - 1) * (sizes[1] - 1) * (sizes[2] - 1))
        m = np.empty((3, 3))  # m[c, a] = delta_ca + d u_c / d x_a
        for k in range(sizes[0] - 1):
            for j in range(sizes[1] - 1):
                for i in range(sizes[2] - 1):
                    for c in range(3):
                        u = start[c, k, j, i] + control[c, k, j, i] * to_control[c]
                        m[c, 0] = start[c, k + 1, j, i] + control[c, k + 1, j, i] * to_control[c] - u
                        m[c, 1] = start[c, k, j + 1, i] + control[c, k, j + 1, i] * to_control[c] - u
                        m[c, 2] = start[c, k, j, i + 1] + control[c, k, j, i + 1] * to_control[c] - u
                        m[c, c] += 1.0
                    det = (m[0, 0] * (m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1])
                           - m[0, 1] * (m[1, 0] * m[2, 2] - m[1, 2] * m[2, 0])
                           + m[0, 2] * (m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0]))
                    if det >= 0.1:
                        continue
                    total += scale * (0.1 - det) ** 2
                    factor = -2 * scale * (0.1 - det)
                    for c in range(3):
                        c1, c2 = (c + 1) % 3, (c + 2) % 3
                        for a in range(3):  # d det / d m[c, a]: the cofactor
                            a1, a2 = (a + 1) % 3, (a + 2) % 3
                            g = factor * (m[c1, a1] * m[c2, a2] - m[c1, a2] * m[c2, a1]) * to_control[c]
                            gradient[c, k + int(a == 0), j + int(a == 1), i + int(a == 2)] += g
                            gradient[c, k, j, i] -= g
    return total
