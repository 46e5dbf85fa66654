"""Smooth synthetic volumes with a known shift: registration checks with an exact answer."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def shifted_blobs(shape: tuple[int, int, int] = (16, 48, 56), spacing: tuple[float, float, float] = (0.4, 0.3, 0.8),
                  shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0), seed: int = 0) -> sitk.Image:
    """Twelve Gaussian blobs (sigma 2 mm) in a (k, j, i) volume; `shift_mm` (x, y, z) moves the
    whole pattern by that many mm, so the true displacement between two such volumes is known."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    x, y, z = i * spacing[0] - shift_mm[0], j * spacing[1] - shift_mm[1], k * spacing[2] - shift_mm[2]
    extent = np.array([shape[2] * spacing[0], shape[1] * spacing[1], shape[0] * spacing[2]])
    volume = np.zeros(shape)
    for _ in range(12):
        cx, cy, cz = rng.uniform(0, 1, 3) * extent
        volume += 100 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * 2.0 ** 2))
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing(spacing)
    return image
