"""Register one moving volume to a fixed volume, with optional despeckling first, and measure it.

Pre-processing (none, OBNLM or a U-Net) is applied to both volumes before registration, as in
the paper's protocol; the field found is then applied to the original moving volume.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import SimpleITK as sitk

from us3d import metrics
from us3d.despeckle import ObnlmSettings, UnetSettings, despeckle
from us3d.errors import InputError
from us3d.registration.demons import register_demons
from us3d.registration.fields import endpoint_error, folding_fraction, same_grid, warp

METHODS = ("demons",)
PREPROCESSING = ("none", "obnlm", "unet")


@dataclasses.dataclass
class PairResult:
    """Field (fixed grid, LPS mm), warped original moving volume and the pair's figures.

    MSE is on intensities scaled to [0, 1] by the fixed volume's range, between the fixed and
    the (warped) moving volume after pre-processing, before and after registration.
    """

    field: sitk.Image
    warped: sitk.Image
    mse_before: float
    mse_after: float
    smpi: float | None  # SMPI of the pre-processing on the fixed volume (None without)
    folding: float
    seconds: float
    endpoint_error: tuple[float, float] | None = None  # (mean, p95) mm, when a true field is given
    resampled: bool = False  # the moving volume was on another grid and was resampled


def preprocess_settings(name: str, model: str = "unet-obnlm") -> ObnlmSettings | UnetSettings | None:
    if name not in PREPROCESSING:
        raise InputError(f"pre-processing must be one of {', '.join(PREPROCESSING)}, not {name!r}")
    return {"none": None, "obnlm": ObnlmSettings(), "unet": UnetSettings(model)}[name]


def _scaled_mse(a: np.ndarray, b: np.ndarray, low: float, high: float) -> float:
    scale = (high - low) or 1.0
    return metrics.mse((a - low) / scale, (b - low) / scale)


def check_pair(fixed: sitk.Image, moving: sitk.Image) -> bool:
    """Raise InputError for unusable volumes; True when moving is on another grid than fixed."""
    for name, image in (("fixed", fixed), ("moving", moving)):
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"the {name} volume must be a 3D grey-level volume")
        if min(image.GetSize()) < 2:
            raise InputError(f"the {name} volume is 2D ({image.GetSize()}); a 3D volume is needed")
    return not same_grid(fixed, moving)


def on_fixed_grid(fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.Image, bool]:
    """(moving on the fixed grid, whether it had to be resampled), so every figure compares the same voxels."""
    resampled = check_pair(fixed, moving)
    if resampled:
        moving = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return moving, resampled


def despeckled(image: sitk.Image, preprocessing: str, device: str = "auto",
               cancel: Callable[[], bool] | None = None) -> sitk.Image:
    """The volume as the registration sees it: float32, despeckled by `preprocessing` unless "none"."""
    settings = preprocess_settings(preprocessing)
    if settings is None:
        return sitk.Cast(image, sitk.sitkFloat32)
    return despeckle(image, settings, device, cancel=cancel).output


def register_pair(fixed: sitk.Image, moving: sitk.Image, method: str = "demons", preprocessing: str = "none",
                  device: str = "auto", truth: sitk.Image | None = None, truth_mask: np.ndarray | None = None,
                  cancel: Callable[[], bool] | None = None,
                  moving_despeckled: sitk.Image | None = None) -> PairResult:
    """Register `moving` onto `fixed`; see PairResult. `truth`: the true field, for endpoint error.

    `moving_despeckled`: `despeckled(moving, preprocessing)` when the caller already has it (one
    moving volume registered to many fixed frames); `moving` must then be on the fixed grid.
    """
    if method not in METHODS:
        raise InputError(f"registration method must be one of {', '.join(METHODS)}, not {method!r}")
    moving, resampled = on_fixed_grid(fixed, moving)
    start = time.perf_counter()
    fixed_in = despeckled(fixed, preprocessing, device, cancel)
    moving_in = moving_despeckled if moving_despeckled is not None else despeckled(moving, preprocessing, device,
                                                                                   cancel)
    smpi = None
    if preprocessing != "none":
        smpi = metrics.smpi(sitk.GetArrayViewFromImage(fixed).astype(np.float64),
                            sitk.GetArrayViewFromImage(fixed_in).astype(np.float64))
    field = register_demons(fixed_in, moving_in, cancel=cancel)
    seconds = time.perf_counter() - start
    fixed_array = sitk.GetArrayViewFromImage(fixed_in).astype(np.float64)
    low, high = float(fixed_array.min()), float(fixed_array.max())
    before = _scaled_mse(fixed_array, sitk.GetArrayViewFromImage(moving_in).astype(np.float64), low, high)
    # GetArrayFromImage, not a view: a view of a temporary image would outlive its buffer
    after = _scaled_mse(fixed_array, sitk.GetArrayFromImage(warp(moving_in, field)).astype(np.float64), low, high)
    epe = endpoint_error(field, truth, truth_mask) if truth is not None else None
    return PairResult(field, warp(moving, field), before, after, smpi, folding_fraction(field), seconds, epe, resampled)
