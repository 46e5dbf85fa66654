"""Displacement fields: warping, Jacobian determinant, folding, endpoint error.

A field is a SimpleITK image of 3-vectors (float32 from the registration, float32 or float64
otherwise) on the fixed volume's grid: d(x) in mm,
(x, y, z) LPS components, and warping the moving volume gives moving(x + d(x)) at each fixed
voxel x. This is ITK's displacement-field transform, which Slicer loads as a grid transform,
and the convention of the phantom's ground truth (frame t <- frame 0).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from us3d.errors import InputError


def field_image(displacement: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Field image (float64, what ITK's displacement-field transform takes) from a (k, j, i, 3) array
    in mm on `reference`'s grid."""
    return _vector_image(np.asarray(displacement, np.float64), reference)


def _vector_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=True)
    image.CopyInformation(reference)
    return image


def displacement_to_field(displacement: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Field image (float32) on `reference`'s grid from a (3, k, j, i) displacement in voxels, channels
    (k, j, i) (the networks' and the refinement's layout). float32 is what the registration computes
    and what `write_field` writes; a float64 field of a 256x256x128 frame took a third of a second
    more to make. Cast it to float64 for ITK's displacement-field transform, as `warp` does."""
    spacing = np.asarray(reference.GetSpacing())
    direction = np.reshape(reference.GetDirection(), (3, 3))
    # row a: the mm (x, y, z) of one voxel step along channel a = index axis (k, j, i)[a]
    to_mm = (direction * spacing).T[::-1].astype(np.float32)
    voxels = np.asarray(displacement, np.float32).reshape(3, -1)
    mm = (voxels.T @ to_mm).reshape(displacement.shape[1:] + (3,))  # (k, j, i, [x, y, z])
    return _vector_image(mm, reference)


def field_array(field: sitk.Image) -> np.ndarray:
    """(k, j, i, 3) float64 displacements in mm, (x, y, z) LPS."""
    check_field(field)
    return sitk.GetArrayFromImage(field).astype(np.float64)


def read_field(path: str | os.PathLike) -> sitk.Image:
    """A displacement field file (e.g. .mha), checked; InputError for anything else."""
    if not Path(path).is_file():
        raise InputError(f"displacement field {path} not found")
    try:
        field = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"{path}: not a readable image") from None
    try:
        check_field(field)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    return field


def write_field(field: sitk.Image, path: str | os.PathLike) -> None:
    """Write a displacement field (e.g. .mha, which Slicer loads as a transform) in float32: half
    the size of float64, and 0.1 micrometre steps at 20 mm of motion."""
    from us3d.io import write_volume

    check_field(field)
    write_volume(field if field.GetPixelID() == sitk.sitkVectorFloat32 else sitk.Cast(field, sitk.sitkVectorFloat32),
                 path)


def check_field(field: sitk.Image) -> None:
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise InputError("a displacement field must be a 3D image of 3-vectors (mm)")


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Same size, and spacing, origin and direction equal to floating-point tolerance."""
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def warp(moving: sitk.Image, field: sitk.Image, interpolator: int = sitk.sitkLinear,
         default_value: float = 0.0, extrapolate: bool = False) -> sitk.Image:
    """moving(x + d(x)) on the field's (fixed) grid, float32; the moving volume's own geometry is
    used, so fixed and moving may have different spacing, origin or direction. Where x + d(x) lies
    outside the moving volume: `default_value`, or with `extrapolate` the nearest voxel's value."""
    check_field(field)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))  # takes a copy
    return sitk.Resample(moving, field, transform, interpolator, default_value, sitk.sitkFloat32, extrapolate)


def warp_voxels(moving: sitk.Image, displacement: np.ndarray, extrapolate: bool = False) -> sitk.Image:
    """What `warp(moving, displacement_to_field(displacement, moving), extrapolate=extrapolate)` gives
    (linear, default value 0), for a (3, k, j, i) displacement in voxels, channels (k, j, i), on
    `moving`'s own grid, without the field in mm: a compiled kernel, several times faster on large
    volumes."""
    from us3d.registration import _fields_cpu

    if displacement.shape != (3,) + sitk.GetArrayViewFromImage(moving).shape:
        raise InputError("the displacement is not on the moving volume's grid")
    volume = sitk.GetArrayFromImage(moving).astype(np.float32, copy=False)
    out = np.empty_like(volume)
    _fields_cpu.warp(volume, np.ascontiguousarray(displacement, dtype=np.float32), extrapolate, out)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(moving)
    return image


def jacobian_determinant(field: sitk.Image) -> np.ndarray:
    """det(I + grad d) per voxel, (k, j, i); <= 0 where the mapping folds."""
    check_field(field)
    determinant = sitk.DisplacementFieldJacobianDeterminant(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.GetArrayFromImage(determinant)


def folding_fraction(field: sitk.Image) -> float:
    """Fraction of voxels where the Jacobian determinant is <= 0."""
    return float(np.mean(jacobian_determinant(field) <= 0))


def endpoint_error(field: sitk.Image, truth: sitk.Image, mask: np.ndarray | None = None) -> tuple[float, float]:
    """(mean, 95th percentile) of |d - d_true| in mm, over `mask` (k, j, i) or every voxel."""
    estimate, reference = field_array(field), field_array(truth)
    if estimate.shape != reference.shape:
        raise InputError("the field and the true field are not on the same grid")
    error = np.linalg.norm(estimate - reference, axis=-1)
    if mask is not None:
        error = error[mask]
    if error.size == 0:
        raise InputError("the mask selects no voxels")
    return float(error.mean()), float(np.percentile(error, 95))


def source_inside(field: sitk.Image, moving: sitk.Image) -> np.ndarray:
    """(k, j, i) bool mask of the fixed voxels x whose x + d(x) falls inside `moving`'s grid: where
    motion can be tracked at all (tissue that came in from outside the field of view cannot)."""
    check_field(field)
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.GetArrayFromImage(sitk.Resample(ones, field, transform, sitk.sitkNearestNeighbor, 0)) > 0
