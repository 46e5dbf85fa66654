"""Register one moving volume to a fixed volume, with optional despeckling first, and measure it.

Pre-processing (none, OBNLM or a U-Net) is applied to both volumes before registration, as in
the paper's protocol; the field found is then applied to the original moving volume.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable

import numpy as np
import SimpleITK as sitk

from us3d import metrics
from us3d.despeckle import ObnlmSettings, UnetSettings, despeckle
from us3d.devices import resolve_device
from us3d.errors import Cancelled, InputError
from us3d.io import VolumeSequence
from us3d.registration.demons import register_demons
from us3d.registration.fields import endpoint_error, folding_fraction, same_grid, source_inside, warp

METHODS = ("voxelmorph", "demons")
PREPROCESSING = ("none", "obnlm", "unet")


@dataclasses.dataclass
class PairResult:
    """Field (fixed grid, LPS mm), warped original moving volume and the pair's figures.

    MSE is on intensities scaled to [0, 1] by the fixed volume's range, between the fixed and
    the (warped) moving volume after pre-processing, before and after registration. The endpoint
    error is over the voxels whose true source lies inside the moving volume (`source_inside`),
    unless the caller gives another mask.
    """

    field: sitk.Image
    warped: sitk.Image
    mse_before: float
    mse_after: float
    smpi: float | None  # SMPI of the pre-processing on the fixed volume (None without)
    folding: float
    seconds: float
    endpoint_error: tuple[float, float] | None = None  # (mean, p95) mm, when a true field is given (see above)
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


Registrar = Callable[[sitk.Image, sitk.Image, Callable[[], bool] | None], sitk.Image]


def registrar(method: str = "voxelmorph", preprocessing: str = "none", device: str = "auto",
              model: str | None = None) -> Registrar:
    """A function (fixed, moving on the fixed grid, cancel) -> field for `method`, ready to be called
    for many pairs (VoxelMorph's model is loaded once). `model`: a VoxelMorph model name or file;
    by default the bundled one (trained on all three pre-processings)."""
    if method not in METHODS:
        raise InputError(f"registration method must be one of {', '.join(METHODS)}, not {method!r}")
    preprocess_settings(preprocessing)  # checks the name
    if method == "demons":
        return lambda fixed, moving, cancel: register_demons(fixed, moving, cancel=cancel)
    from us3d.models.bundle import load_model
    from us3d.registration.voxelmorph import model_name, register_voxelmorph

    used = resolve_device(device)
    loaded = load_model(model or model_name(preprocessing), used)
    if loaded.metadata.get("task") != "registration":
        raise InputError(f"{loaded.name} is not a registration model")
    trained_on = loaded.metadata.get("preprocessing", [])
    if preprocessing not in trained_on:
        warnings.warn(f"{loaded.name} was trained on {', '.join(trained_on)} inputs, not {preprocessing}")
    return lambda fixed, moving, cancel: register_voxelmorph(fixed, moving, loaded.module, used)


def register_pair(fixed: sitk.Image, moving: sitk.Image, method: str = "voxelmorph", preprocessing: str = "none",
                  device: str = "auto", truth: sitk.Image | None = None, truth_mask: np.ndarray | None = None,
                  cancel: Callable[[], bool] | None = None, moving_despeckled: sitk.Image | None = None,
                  register: Registrar | None = None) -> PairResult:
    """Register `moving` onto `fixed`; see PairResult. `truth`: the true field, for endpoint error.

    `moving_despeckled`: `despeckled(moving, preprocessing)` when the caller already has it (one
    moving volume registered to many fixed frames); `moving` must then be on the fixed grid.
    `register`: `registrar(method, preprocessing, device)` when the caller already has it.
    """
    register = register or registrar(method, preprocessing, device)
    moving, resampled = on_fixed_grid(fixed, moving)
    start = time.perf_counter()
    fixed_in = despeckled(fixed, preprocessing, device, cancel)
    moving_in = moving_despeckled if moving_despeckled is not None else despeckled(moving, preprocessing, device,
                                                                                   cancel)
    result = _register_prepared(fixed, fixed_in, moving, moving_in, preprocessing != "none", register, start, truth,
                                truth_mask, cancel)
    result.resampled = resampled
    return result


def _register_prepared(fixed: sitk.Image, fixed_in: sitk.Image, moving: sitk.Image, moving_in: sitk.Image,
                       despeckled: bool, register: Registrar, start: float, truth: sitk.Image | None,
                       truth_mask: np.ndarray | None, cancel: Callable[[], bool] | None) -> PairResult:
    """Register pre-processed volumes (`*_in`, on one grid) and measure; `start`: when the pair's work began."""
    smpi = None
    if despeckled:
        smpi = metrics.smpi(sitk.GetArrayViewFromImage(fixed).astype(np.float64),
                            sitk.GetArrayViewFromImage(fixed_in).astype(np.float64))
    field = register(fixed_in, moving_in, cancel)
    seconds = time.perf_counter() - start
    fixed_array = sitk.GetArrayViewFromImage(fixed_in).astype(np.float64)
    low, high = float(fixed_array.min()), float(fixed_array.max())
    before = _scaled_mse(fixed_array, sitk.GetArrayViewFromImage(moving_in).astype(np.float64), low, high)
    # GetArrayFromImage, not a view: a view of a temporary image would outlive its buffer
    after = _scaled_mse(fixed_array, sitk.GetArrayFromImage(warp(moving_in, field)).astype(np.float64), low, high)
    if truth is not None and truth_mask is None:
        truth_mask = source_inside(truth, moving)
    epe = endpoint_error(field, truth, truth_mask) if truth is not None else None
    return PairResult(field, warp(moving, field), before, after, smpi, folding_fraction(field), seconds, epe)


def register_sequence(sequence: VolumeSequence, reference_frame: int = 0, method: str = "voxelmorph",
                      preprocessing: str = "none", device: str = "auto", truths: list[sitk.Image] | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      cancel: Callable[[], bool] | None = None) -> list[PairResult]:
    """The paper's protocol: frame `reference_frame` (the exhale frame) is the moving volume,
    registered to every frame of `sequence` (itself included, which gives a near-zero field).

    The sequence is pre-processed once; `truths`: the true field of each frame (frame t <- the
    reference frame), for endpoint errors. `seconds` of each pair excludes the pre-processing.
    """
    if len(sequence) == 0:
        raise InputError("the sequence has no frames")
    if not 0 <= reference_frame < len(sequence):
        raise InputError(f"the reference frame must be between 0 and {len(sequence) - 1}, not {reference_frame}")
    if truths is not None and len(truths) != len(sequence):
        raise InputError(f"{len(truths)} true fields for {len(sequence)} frames")
    register = registrar(method, preprocessing, device)
    settings = preprocess_settings(preprocessing)
    prepared = (sequence.with_frames(sequence.frames.astype(np.float32)) if settings is None
                else despeckle(sequence, settings, device, cancel=cancel).output)
    moving, moving_in = sequence.frame_image(reference_frame), prepared.frame_image(reference_frame)
    results = []
    for t in range(len(sequence)):
        if cancel is not None and cancel():
            raise Cancelled()
        fixed = sequence.frame_image(t)
        results.append(_register_prepared(fixed, prepared.frame_image(t), moving, moving_in, settings is not None, register,
                                          time.perf_counter(), None if truths is None else truths[t], None, cancel))
        if progress is not None:
            progress(t + 1, len(sequence))
    return results
