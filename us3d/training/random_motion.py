"""Training pairs with a random smooth motion: a volume warped by a known random field.

The simulator's breathing is one family of motions (a bulk shift, a depth dependence, a sliding
wall), and a network trained on it alone learns that family: on real speckle warped by other
smooth motions it did no better than its own rigid step (`benchmarks/bench_registration_real.py`).
Pairs made here are meant to teach it to measure motion in any texture, as SynthMorph's random
pairs do (Hoffmann et al., IEEE TMI 2022). From one training frame:

- its texture is rescaled by a random zoom (1-2 times in-plane and, independently, in elevation),
  so that speckle and structures take other sizes than the simulator's on the voxel grid;
- half of the time it is seen through a random data hull (25-90% of the grid; the rest 0, as a
  sector scan or a freehand reconstruction leaves it), which either moves with the tissue or stays;
- it is warped by a random smooth field (`random_field_mm`), and each volume gets its own speckle
  decorrelation noise.

The fixed volume is the warped one: fixed(x) = moving(x + u(x)), u in voxels (k, j, i).

`us3d train-register --random-motion SHARE` mixes them in; the bundled model does not use them yet:
fine-tuning it for a few hundred steps with such pairs left it at its rigid step on them (issue 11).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from us3d.registration.voxelmorph import transform


def random_field_mm(shape: tuple[int, int, int], spacing: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """(3, k, j, i) float32 displacement in mm, channels (k, j, i): a bulk shift (standard deviation
    0-5 mm per axis, drawn) plus a deformation whose control points lie 12-30 mm apart, trilinearly
    interpolated, with a standard deviation of 0.3-3 mm drawn per field but at most an eighth of the
    control spacing (so it does not fold). `spacing`: (k, j, i) mm."""
    extent = np.asarray(shape) * np.asarray(spacing)
    control = rng.uniform(12.0, 30.0)
    points = [max(2, int(round(e / control)) + 1) for e in extent]
    local = min(rng.uniform(0.3, 3.0), control / 8)
    coarse = rng.normal(0.0, local, (1, 3, *points)) + rng.normal(0.0, rng.uniform(0.0, 5.0), (1, 3, 1, 1, 1))
    field = F.interpolate(torch.from_numpy(coarse).float(), size=list(shape), mode="trilinear", align_corners=True)
    return field[0]


def random_hull(shape: tuple[int, int, int], rng: np.random.Generator) -> torch.Tensor:
    """(k, j, i) bool: a random smooth blob holding 25-90% of the grid (thresholded smooth noise)."""
    coarse = torch.from_numpy(rng.normal(size=(1, 1, 3, 4, 4))).float()
    smooth = F.interpolate(coarse, size=list(shape), mode="trilinear", align_corners=True)[0, 0]
    return smooth >= torch.quantile(smooth.flatten(), 1.0 - rng.uniform(0.25, 0.9))


def _zoomed(volume: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(k, j, i) volume: a random crop enlarged back to the grid, by a zoom of 1-2 in-plane and
    (independently) in elevation."""
    in_plane, elevation = np.exp(rng.uniform(0.0, np.log(2.0), 2))
    shape = volume.shape
    crop = [max(2, int(round(n / z))) for n, z in zip(shape, (elevation, in_plane, in_plane))]
    start = [int(rng.integers(0, n - c + 1)) for n, c in zip(shape, crop)]
    block = volume[start[0]:start[0] + crop[0], start[1]:start[1] + crop[1], start[2]:start[2] + crop[2]]
    return F.interpolate(block[None, None], size=list(shape), mode="trilinear", align_corners=False)[0, 0]


def random_motion_pair(volume: np.ndarray, spacing: np.ndarray,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fixed, moving, true voxel displacement (3, k, j, i)) made from `volume` (k, j, i), whose
    voxels are `spacing` (k, j, i) mm apart; see the module. Intensities stay >= 0 and the hull's
    outside is 0."""
    moving = _zoomed(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).clamp(min=0), rng)
    shape = tuple(moving.shape)
    voxels = random_field_mm(shape, spacing, rng) / torch.from_numpy(np.asarray(spacing, np.float32)).view(3, 1, 1, 1)
    hull = random_hull(shape, rng) if rng.random() < 0.5 else None
    moves_with_tissue = rng.random() < 0.5
    if hull is not None and moves_with_tissue:
        moving = moving * hull
    fixed = transform(moving[None, None], voxels[None])[0, 0]
    if hull is not None and not moves_with_tissue:
        moving, fixed = moving * hull, fixed * hull
    noise = rng.uniform(0.0, 0.25) * float(moving[moving > 0].std()) if bool((moving > 0).any()) else 0.0
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    pair = []
    for image in (fixed, moving):
        data = image > 0
        noisy = (image + noise * torch.randn(shape, generator=generator)).clamp(min=0) * data
        pair.append(noisy.numpy())
    return pair[0], pair[1], voxels.numpy()
