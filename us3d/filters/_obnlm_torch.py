"""Torch implementation of the blockwise OBNLM kernel, for CUDA (it runs on CPU too, for tests).

Same algorithm and conventions as `_obnlm_cpu.obnlm_padded`: (k, j, i) arrays, per-axis radii,
vectorised over all block centres of a chunk of centre planes, one loop over search offsets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mirror_indices(margin: int, size: int, device: torch.device) -> torch.Tensor:
    """Indices -margin .. size+margin-1 mapped by the public mirror rule (|i| below 0, 2N-1-i past N)."""
    index = torch.arange(-margin, size + margin, device=device)
    index = torch.where(index < 0, -index, index)
    index = torch.where(index >= size, 2 * size - 1 - index, index)
    return index.clamp(0, size - 1)


def _mirror_extend(x: torch.Tensor, margin: tuple[int, int, int]) -> torch.Tensor:
    for axis, (m, n) in enumerate(zip(margin, x.shape)):
        x = x.index_select(axis, _mirror_indices(m, n, x.device))
    return x


def _windows(x: torch.Tensor, start: tuple[int, ...], count: tuple[int, ...],
             step: tuple[int, ...], block: tuple[int, ...]) -> torch.Tensor:
    """View of shape count + (2a+1,)*3: the block around each centre, starting at `start`."""
    view = x[tuple(slice(s, s + (c - 1) * st + 2 * a + 1)
                   for s, c, st, a in zip(start, count, step, block))]
    for axis, (st, a) in enumerate(zip(step, block)):
        view = view.unfold(axis, 2 * a + 1, st)
    return view


def obnlm_padded_torch(x: torch.Tensor, search, block, step, mean_radius, h: float,
                       ratio_low: float, ratio_high: float, max_elements: int = 2**27) -> torch.Tensor:
    """Blockwise OBNLM on a padded, offset volume x (k, j, i) tensor; returns the estimate.

    Centre planes are processed in chunks so that per-chunk work arrays stay under
    `max_elements` values.
    """
    shape = tuple(x.shape)
    search, block, step = tuple(search), tuple(block), tuple(step)
    mean_radius = tuple(mean_radius)
    n_centres = tuple((n + s - 1) // s for n, s in zip(shape, step))
    block_size = 1
    for a in block:
        block_size *= 2 * a + 1

    mean = F.avg_pool3d(_mirror_extend(x, mean_radius)[None, None],
                        tuple(2 * r + 1 for r in mean_radius), stride=1)[0, 0]
    # Arrays padded by a+M so that every candidate block is a plain slice; out-of-image voxels
    # take the value 0 here and are replaced below (values, inside mask, local means).
    margin = tuple(a + m for a, m in zip(block, search))
    pad = [p for m in reversed(margin) for p in (m, m)]
    x_zero = F.pad(x, pad)
    inside = F.pad(torch.ones_like(x, dtype=torch.bool), pad)
    x_ext = _mirror_extend(x, margin)
    mean_pad = F.pad(mean, [p for m in reversed(search) for p in (m, m)])

    est = torch.zeros_like(x)
    lab = torch.zeros_like(x)
    plane_elements = n_centres[1] * n_centres[2] * block_size
    planes_per_chunk = max(1, min(n_centres[0], max_elements // max(plane_elements, 1)))
    inv_h2 = 1.0 / (h * h)

    for first in range(0, n_centres[0], planes_per_chunk):
        count = (min(planes_per_chunk, n_centres[0] - first), n_centres[1], n_centres[2])
        origin = (first * step[0], 0, 0)  # first centre of the chunk, image coordinates
        centre_index = [torch.arange(c, device=x.device) * st + o
                        for c, st, o in zip(count, step, origin)]
        centre_mean = mean[tuple(idx.view([-1 if a == axis else 1 for a in range(3)])
                                 for axis, idx in enumerate(centre_index))]
        acc = torch.zeros(count + tuple(2 * a + 1 for a in block), dtype=x.dtype, device=x.device)
        weight_sum = torch.zeros(count, dtype=x.dtype, device=x.device)
        weight_max = torch.zeros(count, dtype=x.dtype, device=x.device)
        for dk in range(-search[0], search[0] + 1):
            for dj in range(-search[1], search[1] + 1):
                for di in range(-search[2], search[2] + 1):
                    if dk == 0 and dj == 0 and di == 0:
                        continue
                    offset = (dk, dj, di)
                    valid = None
                    for axis, (idx, d, n) in enumerate(zip(centre_index, offset, shape)):
                        ok = ((idx + d >= 0) & (idx + d < n)).view(
                            [-1 if a == axis else 1 for a in range(3)])
                        valid = ok if valid is None else valid & ok
                    if not bool(valid.any()):
                        continue
                    # Distances: box mean of the Pearson-like terms over each block.
                    lo = tuple(m - a + o for m, a, o in zip(margin, block, origin))
                    length = tuple((c - 1) * st + 2 * a + 1 for c, st, a in zip(count, step, block))
                    centre_vals = x_ext[tuple(slice(s, s + n) for s, n in zip(lo, length))]
                    cand_vals = x_ext[tuple(slice(s + d, s + d + n) for s, d, n in zip(lo, offset, length))]
                    terms = (centre_vals - cand_vals) ** 2 / ((centre_vals + cand_vals) * 0.5)
                    distance = F.avg_pool3d(terms[None, None], tuple(2 * a + 1 for a in block),
                                            stride=step)[0, 0]
                    cand_mean = mean_pad[tuple(slice(m + o + d, m + o + d + (c - 1) * st + 1, st)
                                               for m, o, d, c, st in zip(search, origin, offset, count, step))]
                    ratio = centre_mean / cand_mean
                    keep = valid & (cand_mean > 1e-7) & (ratio > ratio_low) & (ratio < ratio_high)
                    weight = torch.where(keep, torch.exp(-distance * inv_h2), torch.zeros_like(distance))
                    weight_max = torch.maximum(weight_max, weight)
                    weight_sum += weight
                    # Candidate blocks; voxels outside the image take the candidate's centre value.
                    start = tuple(m - a + o + d for m, a, o, d in zip(margin, block, origin, offset))
                    values = _windows(x_zero, start, count, step, block)
                    in_image = _windows(inside, start, count, step, block)
                    centre_start = tuple(m + o + d for m, o, d in zip(margin, origin, offset))
                    cand_centre = x_zero[tuple(slice(s, s + (c - 1) * st + 1, st)
                                               for s, c, st in zip(centre_start, count, step))]
                    blocks = torch.where(in_image, values, cand_centre[..., None, None, None])
                    acc += weight[..., None, None, None] * blocks
        self_weight = torch.where(weight_max == 0, torch.ones_like(weight_max), weight_max)
        own = _windows(x_zero, tuple(m - a + o for m, a, o in zip(margin, block, origin)),
                       count, step, block)
        estimate = (acc + self_weight[..., None, None, None] * own) / \
            (weight_sum + self_weight)[..., None, None, None]
        # Spread each block estimate over its in-image voxels.
        est_pad = F.pad(est, [p for a in reversed(block) for p in (a, a)])
        lab_pad = F.pad(lab, [p for a in reversed(block) for p in (a, a)])
        for pk in range(2 * block[0] + 1):
            for pj in range(2 * block[1] + 1):
                for pi in range(2 * block[2] + 1):
                    target = tuple(slice(o + p, o + p + (c - 1) * st + 1, st)
                                   for o, p, c, st in zip(origin, (pk, pj, pi), count, step))
                    est_pad[target] += estimate[..., pk, pj, pi]
                    lab_pad[target] += 1.0
        crop = tuple(slice(a, a + n) for a, n in zip(block, shape))
        est = est_pad[crop].contiguous()
        lab = lab_pad[crop].contiguous()
    return torch.where(lab > 0, est / lab.clamp(min=1), x)
