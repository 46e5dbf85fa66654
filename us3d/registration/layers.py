"""Translations of depth bands: a second guess for layers that slide over each other.

Under the skin, the abdominal wall slides over the liver capsule, or moves with the liver, from one
breath to the next. The wall is layered along the probe's lateral axis, the axis it slides along, so
its motion shows only in its speckle, at full resolution; a network's coarse levels do not see it and
fall back on what their training data made likely. This module gives a second estimate that does
look: each band of depth (3 mm thick) is registered by its own FFT translation, and each voxel takes
that band's shift where it leaves a clearly smaller local squared difference of the volumes than the
estimate it had. The refinement (`us3d.registration.refine`) then starts from the result.

A band's translation is measured on a slab around it (10 mm thick), placed three ways
(`SLAB_PLACEMENTS`): centred on the band, or reaching from the band to one side only. Near the
interface between a layer that stays and one that slides, the centred slab holds both motions and
measures a mixture; a one-sided slab that stays within one layer measures that layer's motion
alone (the shiftable windows of edge-preserving filters). Each voxel takes the placement whose
shift leaves the smallest local squared difference.

Only voxels with data count: outside a sector scan a B-mode volume is empty, and that empty region
does not move with the tissue, so an edge of it would pull every shift near a sector's apex to zero.

The depth axis is the in-plane axis along which speckle decorrelates faster: ultrasound's axial
resolution is finer than its lateral one.
"""

from __future__ import annotations

from typing import Callable

import torch

from us3d.registration import separable
from us3d.registration.refine import locally_normalised
from us3d.registration.voxelmorph import _detail, detail_spectra, detail_translation, normalised, transform

#: Where a band's slab lies along the depth axis: centred on the band, ending at the band's far end and
#: reaching towards lower indices ("before"), or starting at the band and reaching towards higher ones
#: ("after"); clamped to the volume. Which of the two is shallower depends on the volume's orientation.
SLAB_PLACEMENTS = ("centred", "before", "after")


def depth_axis(volume: torch.Tensor, spacing: tuple[float, float, float], lag_mm: float = 0.6) -> int:
    """The dimension of a (b, c, k, j, i) `volume` that runs along depth: 3 (j) or 4 (i).

    Parameters
    ----------
    volume : B-mode volume, (b, c, k, j, i); only the first volume and channel are read.
    spacing : voxel spacing (k, j, i), mm.
    lag_mm : the speckle's correlation is compared at this lag, mm, along j and along i.
    """
    sample = volume[0, 0, ::max(1, volume.shape[2] // 8)]  # about 8 slices are plenty, and 4x faster
    data = sample.float()
    data = data - data.mean()
    floor = sample.min()
    correlations = []
    for dim, step in ((1, spacing[1]), (2, spacing[2])):
        lag = max(1, int(round(lag_mm / step)))
        n = data.shape[dim]
        a, b = data.narrow(dim, 0, n - lag), data.narrow(dim, lag, n - lag)
        raw_a, raw_b = sample.narrow(dim, 0, n - lag), sample.narrow(dim, lag, n - lag)
        inside = (raw_a > floor) & (raw_b > floor)  # outside a sector scan carries no speckle
        a, b = a[inside] - a[inside].mean(), b[inside] - b[inside].mean()
        correlations.append(float((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt().clamp(min=1e-12)))
    return 3 if correlations[0] < correlations[1] else 4


def data_mask(volume: torch.Tensor) -> torch.Tensor:
    """(b, 1, k, j, i) float mask of the voxels of a B-mode `volume` (b, 1, k, j, i) that carry data: not at
    the volume's minimum (outside a sector scan), with single dark voxels of speckle filled in and
    the edge of the data pulled in by one voxel in-plane, where blurred tissue meets the empty region."""
    low = volume.flatten(1).min(1)[0].view(-1, 1, 1, 1, 1)
    filled = _dilated(volume > low, 1)
    return (~_dilated(~filled, 2)).to(volume.dtype)


def _dilated(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A boolean (b, c, k, j, i) mask grown by `radius` voxels along j and i (a square in-plane)."""
    for dim in (3, 4):
        grown = mask.clone()
        n = mask.shape[dim]
        for step in range(1, min(radius, n - 1) + 1):
            grown.narrow(dim, step, n - step).logical_or_(mask.narrow(dim, 0, n - step))
            grown.narrow(dim, 0, n - step).logical_or_(mask.narrow(dim, step, n - step))
        mask = grown
    return mask


def band_translations(fixed: torch.Tensor, moving: torch.Tensor, axis: int, spacing: tuple[float, float, float],
                      band_mm: float = 3.0, slab_mm: float = 10.0,
                      fixed_data: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Each depth band's own translation, measured on a slab around the band placed each of the ways of
    `SLAB_PLACEMENTS`.

    The slabs are cut from the volumes' detail (`translation`'s masked, overlap-normalised
    cross-correlation) at half resolution along every axis, only blocks wholly inside the data
    (`data_mask`) counting, and registered one by one (a slab that two placements share, at the
    volume's ends, once).

    Parameters
    ----------
    fixed, moving : volumes (1, 1, k, j, i) on one grid.
    axis : the depth dimension, 3 (j) or 4 (i) (`depth_axis`).
    spacing : voxel spacing (k, j, i), mm.
    band_mm, slab_mm : thickness of a band and of the slab that is registered for it, mm.
    fixed_data : `data_mask(fixed)`, when already made.

    Returns
    -------
    displacements : (3, 3, k, j, i) voxels: for each placement of `SLAB_PLACEMENTS` in turn, a
        displacement (3, k, j, i), channels (k, j, i), constant in each band of about `band_mm` along
        `axis`: the shift of that band's slab of about `slab_mm`.
    bands : (start, stop) voxels of each band along `axis`.
    """
    reduce = [2, 2, 2]  # no worse than (1, 2, 2) on the validation seeds, in half the time
    f, fixed_mask = _detail(fixed, reduce, data_mask(fixed) if fixed_data is None else fixed_data)
    m, moving_mask = _detail(moving, reduce, data_mask(moving))
    n = f.shape[axis]
    step_mm = reduce[axis - 2] * spacing[axis - 2]  # on the reduced grid
    band = max(2, int(round(band_mm / step_mm)))
    slab = min(n, max(band, int(round(slab_mm / step_mm))))
    starts = list(range(0, n, band))
    offsets = {"centred": band // 2 - slab // 2, "before": band - slab, "after": 0}  # slab start - band start
    lows = [[max(0, min(n - slab, start + offsets[placement])) for start in starts] for placement in SLAB_PLACEMENTS]
    unique = sorted({low for row in lows for low in row})

    def slabs(volume: torch.Tensor) -> torch.Tensor:
        return torch.cat([volume.narrow(axis, low, slab) for low in unique])

    fixed_slabs, fixed_masks, moving_masks = slabs(f), slabs(fixed_mask), slabs(moving_mask)
    moving_spectra = detail_spectra(slabs(m), moving_masks)
    shifts = {}
    for s, low in enumerate(unique):  # one slab at a time: torch's batched inverse FFT is slower here
        # a shift must overlap 30% of the data (`detail_translation`): near a sector's apex little of a slab has any.
        # The peak weighs the correlation by the overlap's square root: a slab is thin along depth, and with the
        # whole volume's fourth root the refinement from the translation erred more (benchmark: standard set
        # 0.217 -> 0.278 mm, sliding 1.315 -> 1.443 mm)
        shifts[low] = detail_translation(fixed_slabs[s:s + 1], fixed_masks[s:s + 1], moving_spectra[s:s + 1],
                                         reduce, min_overlap=0.3, overlap_power=0.5)[0]
    out = torch.empty((len(SLAB_PLACEMENTS), 3) + tuple(fixed.shape[2:]), dtype=fixed.dtype, device=fixed.device)
    full, factor = fixed.shape[axis], reduce[axis - 2]
    bands = [(factor * start, min(full, factor * (start + band))) for start in starts]
    for placement, row in enumerate(lows):
        for (begin, stop), low in zip(bands, row):
            part = out[placement:placement + 1].narrow(axis, begin, stop - begin)
            part.copy_(shifts[low].view(1, 3, 1, 1, 1).expand_as(part))
    return out, bands


def with_layer_translations(fixed: torch.Tensor, moving: torch.Tensor, displacement: torch.Tensor,
                            spacing: tuple[float, float, float], axis: int | None = None, sigma: float = 3.0,
                            margin: float = 0.1, blend: float = 3.0, band_mm: float = 3.0,
                            slab_mm: float = 10.0) -> torch.Tensor:
    """`displacement` with each voxel's shift replaced by its depth band's translation
    (`band_translations`) where that matches better. A new tensor.

    The local squared difference of the normalised volumes (Gaussian-weighted over the fixed volume's
    data) decides: each voxel's candidate is the band shift, of the three slab placements, that leaves
    the smallest; it is taken where it is at least `margin` smaller than with `displacement`, and only
    in bands where the candidates do better than `displacement` over the band as a whole. The choice is
    blended over `blend` voxels along depth and more widely across it where the shifts differ much
    (`_blend_widths`). The result may fold where the choice changes: the refinement that follows
    (`us3d.registration.refine.refine`) removes that.

    Parameters
    ----------
    fixed, moving : volumes (1, 1, k, j, i) on one grid, as registered.
    displacement : (1, 3, k, j, i) the estimate so far, voxels, channels (k, j, i): moving(x + u(x))
        matches fixed(x).
    spacing : voxel spacing (k, j, i), mm.
    axis : the depth dimension, 3 (j) or 4 (i); None finds it (`depth_axis`).
    sigma : Gaussian sigma (voxels) of the local squared difference.
    margin : relative improvement of the local squared difference a band's shift needs to be taken.
    blend : Gaussian sigma (voxels) over which the choice is blended along depth, and at least across it.
    band_mm, slab_mm : see `band_translations`.
    """
    axis = depth_axis(fixed, spacing) if axis is None else axis
    fixed_n, moving_n = normalised(fixed), normalised(moving)
    inside = data_mask(fixed)  # the squared difference is averaged over the fixed volume's data only
    candidates, bands = band_translations(fixed_n, moving_n, axis, spacing, band_mm, slab_mm, inside)
    local_difference = _local_difference(fixed_n, moving_n, inside, lambda v: separable.gaussian(v, sigma, True))
    # each voxel's candidate: the slab placement whose band shift matches best there (elementwise: torch's
    # argmin across a leading dimension of 3 took about 100 ms on a 128x128x32 volume)
    differences = local_difference(candidates)
    candidate, with_candidate = candidates[:1], differences[:1]
    for placement in range(1, len(candidates)):
        closer = differences[placement:placement + 1] < with_candidate
        candidate = torch.where(closer, candidates[placement:placement + 1], candidate)
        with_candidate = torch.minimum(with_candidate, differences[placement:placement + 1])
    with_estimate = local_difference(displacement)
    better = (with_candidate < (1.0 - margin) * with_estimate).to(displacement.dtype)
    for begin, stop in bands:  # a band's shift must match better over the band as a whole
        if float(with_candidate.narrow(axis, begin, stop - begin).mean()) >= \
                float(with_estimate.narrow(axis, begin, stop - begin).mean()):
            better.narrow(axis, begin, stop - begin).zero_()
    weight = separable.apply(better, [separable.gaussian_matrix(better.shape[2 + a], width, better, True)
                                      for a, width in enumerate(_blend_widths(candidate - displacement, better, axis, blend))])
    # folds the blend makes are left to the refinement, which always follows: it smooths its start, penalises
    # folding and unfolds its result (unfolding here too took 50-170 ms a pair and changed no validation figure)
    return displacement * (1.0 - weight) + candidate * weight


def _blend_widths(jump: torch.Tensor, taken: torch.Tensor, axis: int, blend: float) -> list[float]:
    """Gaussian sigmas (k, j, i), voxels, over which the choice `taken` (1, 1, k, j, i) is blended: `blend`
    along depth, where the wall slides past the liver (a shear, which does not fold), and along the
    other axes at least half the largest jump of the displacement along that axis (its 99th
    percentile where taken; `jump`: candidate minus estimate, (1, 3, k, j, i)): a step blurred by sigma
    rises by at most 0.4 / sigma a voxel, so the blend itself then compresses the field by less than 1."""
    chosen = taken[0, 0] > 0
    count = int(chosen.sum())
    widths = []
    for a in range(3):
        if a + 2 == axis or count == 0:
            widths.append(blend)
            continue
        values = jump[0, a][chosen].abs()
        widths.append(max(blend, 0.5 * float(values.kthvalue(max(1, int(0.99 * count))).values)))
    return widths


def with_depth_neighbours(fixed: torch.Tensor, moving: torch.Tensor, displacement: torch.Tensor,
                          spacing: tuple[float, float, float], axis: int, reach_mm: float = 3.0,
                          step_mm: float = 0.6, sigma_depth: float = 1.5, sigma_across: float = 4.0,
                          margin: float = 0.1, local_normalisation: float = 3.0) -> torch.Tensor:
    """`displacement` with each voxel's shift replaced by that of a voxel up to `reach_mm` shallower or
    deeper (along depth, the same column) where that leaves a clearly smaller local squared difference
    of the volumes. A new tensor.

    Next to the base of a thin abdominal wall, an estimate tends to carry the liver's motion some way
    up into the wall (or the wall's down into the liver): a network's coarse levels and a band's slab
    see both layers there. A few millimetres further into its own layer, each voxel's motion is
    estimated well; this step lets the interface move to where the speckle says it is. The local
    squared difference is a Gaussian-weighted mean over the fixed volume's data, narrow along depth
    (`sigma_depth` voxels) and wider across it (`sigma_across` voxels), where the layers run on, of
    locally normalised volumes (`us3d.registration.refine.locally_normalised`): the bright fascia at a
    wall's base would otherwise outweigh the darker speckle around it.

    `us3d.Registrar` runs it only when asked (`depth_neighbours={...}`, its settings): on validation and development
    sequences it lowered the mean error and the error next to the wall's base, but raised the
    sliding set's mean and worst pair, at about 30% more time a pair
    (benchmarks/tune_depth_neighbours.py, RESULTS-depth-neighbours-tuning.md).

    Parameters
    ----------
    fixed, moving : volumes (1, 1, k, j, i) on one grid, as registered.
    displacement : (1, 3, k, j, i) voxels, channels (k, j, i): moving(x + u(x)) matches fixed(x).
    spacing : voxel spacing (k, j, i), mm.
    axis : the depth dimension, 3 (j) or 4 (i) (`depth_axis`).
    reach_mm, step_mm : the neighbours tried lie step_mm, 2 step_mm, ... up to reach_mm away, both ways.
    sigma_depth, sigma_across : Gaussian sigmas, voxels, of the local squared difference.
    margin : relative improvement of the local squared difference a neighbour's shift needs to be taken.
    local_normalisation : Gaussian sigma, voxels, of `locally_normalised`; 0 normalises each volume as a whole.
    """
    fixed_n, moving_n = locally_normalised(fixed, local_normalisation), locally_normalised(moving, local_normalisation)
    inside = data_mask(fixed)
    matrices = [separable.gaussian_matrix(fixed.shape[2 + a], sigma_depth if a + 2 == axis else sigma_across,
                                          fixed, True) for a in range(3)]
    local_difference = _local_difference(fixed_n, moving_n, inside, lambda v: separable.apply(v, matrices))

    n = displacement.shape[axis]
    step = max(1, int(round(step_mm / spacing[axis - 2])))
    reach = min(n - 1, int(round(reach_mm / spacing[axis - 2])))
    with_estimate = local_difference(displacement)
    best, with_best = displacement, with_estimate
    for offset in [s * sign for s in range(step, reach + 1, step) for sign in (1, -1)]:
        source = (torch.arange(n, device=displacement.device) + offset).clamp(0, n - 1)
        neighbour = displacement.index_select(axis, source)
        difference = local_difference(neighbour)
        closer = difference < with_best
        best, with_best = torch.where(closer, neighbour, best), torch.minimum(with_best, difference)
    return torch.where(with_best < (1.0 - margin) * with_estimate, best, displacement)



def _local_difference(fixed: torch.Tensor, moving: torch.Tensor, inside: torch.Tensor,
                      blur: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The local squared difference of `fixed` and `moving` (1, 1, k, j, i): a function that gives, for n
    fields (n, 3, k, j, i, voxels), (n, 1, k, j, i) the `blur`-weighted mean over the fixed volume's
    data `inside` (`data_mask`) of (fixed - moving(x + u))^2, that is blur(inside (...)^2) / blur(inside)."""
    weight_sum = blur(inside).clamp(min=1e-6)

    def local_difference(fields: torch.Tensor) -> torch.Tensor:
        warped = transform(moving.expand(fields.shape[0], -1, -1, -1, -1), fields)
        return blur(inside * (fixed - warped).pow(2)) / weight_sum

    return local_difference
