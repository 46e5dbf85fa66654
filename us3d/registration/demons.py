"""Classical deformable registration with SimpleITK's demons: the method a user would reach for
without a trained model, and the baseline the learned registration is compared with."""

from __future__ import annotations

from typing import Callable

import SimpleITK as sitk

from us3d.errors import Cancelled
from us3d.registration.fields import same_grid, warp

#: Shrink factors (x, y, z) per pyramid level, coarse to fine, and demons iterations per level.
PYRAMID = ((8, 8, 2), (4, 4, 2), (2, 2, 1), (1, 1, 1))
ITERATIONS = (200, 100, 50, 25)


def register_demons(fixed: sitk.Image, moving: sitk.Image, field_sigma: float = 2.0, image_sigma_mm: float = 0.8,
                    pyramid=PYRAMID, iterations=ITERATIONS,
                    cancel: Callable[[], bool] | None = None) -> sitk.Image:
    """Displacement field (on the fixed grid, mm, LPS) that warps `moving` onto `fixed`.

    Multi-resolution diffeomorphic demons on Gaussian-smoothed volumes (sigma `image_sigma_mm`,
    which averages out speckle); `field_sigma` smooths the field at each iteration (voxels of
    the level). A moving volume on another grid is first resampled onto the fixed grid.
    """
    fixed = sitk.SmoothingRecursiveGaussian(sitk.Cast(fixed, sitk.sitkFloat32), image_sigma_mm)
    moving = sitk.SmoothingRecursiveGaussian(sitk.Cast(moving, sitk.sitkFloat32), image_sigma_mm)
    if not same_grid(fixed, moving):
        moving = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    field = None
    for shrink, count in zip(pyramid, iterations):
        shrink = [min(s, n) for s, n in zip(shrink, fixed.GetSize())]
        # smooth to the level's voxel size before shrinking, so coarse levels see anatomy, not speckle
        sigma = [0.5 * f * s for f, s in zip(shrink, fixed.GetSpacing())]
        level_fixed = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, sigma), shrink)
        level_moving = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving, sigma), shrink)
        if field is None:
            initial = sitk.Image(level_fixed.GetSize(), sitk.sitkVectorFloat64, 3)
            initial.CopyInformation(level_fixed)
        else:
            initial = sitk.Resample(field, level_fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                                    sitk.sitkVectorFloat64)
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(count)
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(field_sigma)
        if cancel is not None and cancel():
            raise Cancelled()
        field = demons.Execute(level_fixed, level_moving, initial)
    return sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64) \
        if field.GetSize() != fixed.GetSize() else field


__all__ = ["register_demons", "warp"]
