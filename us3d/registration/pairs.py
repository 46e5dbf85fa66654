"""Register a moving volume to a fixed volume, or to every frame of a 4D sequence, and measure it.

One settings object (`RegistrationSettings`) says how; a `Registrar` holds it with what it has
loaded (the VoxelMorph model, once) and registers pairs and sequences. The public functions
`us3d.register` and `us3d.register_sequence` make one per call (the CLI, the demo and the Slicer
modules go through them); the benchmarks, which register many pairs, keep one `us3d.Registrar`.

Methods:
- "voxelmorph": the bundled VoxelMorph network (its FFT translation, then the learned
  deformation), then `refine_steps` steps of per-pair refinement (`us3d.registration.refine`);
- "translation": the FFT translation alone, then the same refinement (instance optimisation
  without a network; with `refine_steps` 0, a rigid translation);
- "demons": SimpleITK's multi-resolution diffeomorphic demons.

Pre-processing (none, a Gaussian blur, OBNLM or a U-Net) is applied to both volumes before
registration, as in the paper's protocol; the field found is then applied to the original moving
volume. Volumes sampled finer than the network's training data along an axis are registered on a
grid averaged down to that spacing (`working_size`); the field comes back on the input grid.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from us3d import metrics
from us3d.devices import resolve_device
from us3d.errors import Cancelled, InputError
from us3d.io import VolumeSequence
from us3d.registration.fields import (displacement_to_field, endpoint_error, folding_fraction, same_grid,
                                      source_inside, warp, warp_voxels)

from us3d.options import DEFAULT_REFINE_STEPS
from us3d.options import REGISTRATION_METHODS as METHODS
from us3d.options import REGISTRATION_PREPROCESSING as PREPROCESSING

if TYPE_CHECKING:
    from us3d.registration.refine import RefinementSettings


@dataclasses.dataclass(frozen=True)
class RegistrationSettings:
    """How to register.

    Parameters
    ----------
    method : "voxelmorph" (network, then refinement), "translation" (FFT translation, then
        refinement) or "demons" (SimpleITK).
    preprocessing : "none", "gaussian" (sigma 1 voxel), "obnlm" (slice-wise, M=3, alpha=1, h=0.7)
        or "unet" (the U-Net `unet_model`), applied to both volumes before registering.
    refine_steps : Adam steps of per-pair refinement after the network or the translation, which
        first takes each depth band's own translation where it matches better
        (`us3d.registration.layers`); 0 gives the pure network (the paper's VoxelMorph) or the
        translation alone.
    device : "auto", "cpu" or "cuda".
    model : VoxelMorph model, a bundled name or a .pt file (None: the bundled `voxelmorph`).
    unet_model : the U-Net used when `preprocessing` is "unet".
    from_previous_frame : in a sequence, start each frame's refinement from the previous frame's
        result instead of the network's or translation's estimate (see the benchmark).
    """

    method: str = "voxelmorph"
    preprocessing: str = "none"
    refine_steps: int = DEFAULT_REFINE_STEPS
    device: str = "auto"
    model: Optional[str] = None
    unet_model: str = "unet-obnlm"
    from_previous_frame: bool = False

    def arguments(self) -> dict:
        """`us3d.register`'s and `us3d.register_sequence`'s keyword arguments for these settings
        (`from_previous_frame`, a benchmark's variant, is a `Registrar` setting only)."""
        return {"method": self.method, "preprocessing": self.preprocessing, "refine_steps": self.refine_steps,
                "device": self.device, "model": self.model, "unet_model": self.unet_model}

    def check(self) -> None:
        """InputError for a setting out of range or a model (name or file) that does not exist;
        cheap, so callers can check before reading any volume."""
        from us3d.models.bundle import resolve_model

        if self.method not in METHODS:
            raise InputError(f"registration method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.preprocessing not in PREPROCESSING:
            raise InputError(f"pre-processing must be one of {', '.join(PREPROCESSING)}, not {self.preprocessing!r}")
        if not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise InputError(f"refine steps must be a whole number >= 0, not {self.refine_steps!r}")
        if self.method == "voxelmorph":
            resolve_model(self.model or "voxelmorph")
        if self.preprocessing == "unet":
            resolve_model(self.unet_model)


@dataclasses.dataclass
class PairResult:
    """Field (fixed grid, LPS mm), warped original moving volume and the pair's figures.

    MSE is on intensities scaled to [0, 1] by the fixed volume's range, between the fixed and
    the (warped) moving volume after pre-processing, before and after registration. The endpoint
    error is over the voxels whose true source lies inside the moving volume (`source_inside`),
    unless the caller gives another mask.
    """

    field: Optional[sitk.Image]  # None in the figures `register_sequence` keeps when given `on_frame`
    warped: Optional[sitk.Image]
    mse_before: float
    mse_after: float
    smpi: Optional[float]  # SMPI of the pre-processing on the fixed volume (None without)
    folding: float
    seconds: float  # registration of the pair, pre-processing excluded
    endpoint_error: Optional[tuple[float, float]] = None  # (mean, p95) mm, when a true field is given
    resampled: bool = False  # the moving volume was on another grid and was resampled


@dataclasses.dataclass
class PreparedMoving:
    """`Registrar.prepare_moving`'s result: the pre-processed moving volume it was made from, that
    volume on the working grid (1, 1, k, j, i), and the network's share (None without a rebuilt network)."""

    image: sitk.Image
    tensor: torch.Tensor
    network: list[torch.Tensor] | None


def intensity_mse(fixed: sitk.Image, moving: sitk.Image, field: sitk.Image,
                  displacement: np.ndarray | None = None) -> tuple[float, float]:
    """The paper's MSE before and after registration, on intensities scaled to [0, 1] by the fixed
    volume's range; `moving` on the fixed grid, warped by `field` for "after" (or by `displacement`,
    the same field in voxels (3, k, j, i), which is faster). Where the field points outside the
    moving volume, the nearest edge value stands in, as the unwarped moving volume has data
    everywhere "before" is measured (zeros there make large motion look worse after registration)."""
    fixed_array = sitk.GetArrayViewFromImage(fixed)
    scale = (float(fixed_array.max()) - float(fixed_array.min())) or 1.0
    before = _scaled_mse(fixed_array, sitk.GetArrayViewFromImage(moving), scale)
    warped = warp(moving, field, extrapolate=True) if displacement is None else \
        warp_voxels(moving, displacement, extrapolate=True)
    # GetArrayFromImage, not a view: a view of a temporary image would outlive its buffer.
    return before, _scaled_mse(fixed_array, sitk.GetArrayFromImage(warped), scale)


def _scaled_mse(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    """Mean of ((a - b) / scale)^2 (the offset of the [0, 1] scaling cancels), in float64 in one pass
    per array: 4D frames are tens of millions of voxels."""
    difference = np.subtract(a, b, dtype=np.float64).ravel()
    return float(np.dot(difference, difference)) / difference.size / scale ** 2


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


#: The finest voxel size (k, j, i) in mm of the volumes the bundled network was trained on (elevation
#: 0.6-1.1 mm, in-plane 0.2-0.5 mm, either in-plane axis axial). Volumes sampled finer along an axis are
#: registered on a grid averaged down to this spacing there, and the field is interpolated back.
FINEST_TRAINED_SPACING_MM = (0.6, 0.2, 0.2)


def working_size(size: list[int], spacing: tuple[float, float, float]) -> list[int]:
    """The grid (k, j, i) a volume of `size` voxels of `spacing` mm (k, j, i) is registered on: each
    axis sampled finer than `FINEST_TRAINED_SPACING_MM` averaged down to about that spacing, the others
    kept. The network then sees motion and speckle at the scale it was trained on, and the work
    shrinks with the voxel count (a 0.3 mm elevation step: half the slices)."""
    return [max(2, round(n * s / finest)) if s < finest else n
            for n, s, finest in zip(size, spacing, FINEST_TRAINED_SPACING_MM)]


def _tensor(image: sitk.Image, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None].to(device)


def _spacing_kji(image: sitk.Image) -> tuple[float, float, float]:
    spacing = image.GetSpacing()
    return (float(spacing[2]), float(spacing[1]), float(spacing[0]))


class Registrar:
    """Registers pairs and sequences with one `RegistrationSettings`; the VoxelMorph model is
    loaded once, when the registrar is made (InputError for bad settings or a model that is not a
    registration model). `refinement`: the refinement's settings but its steps, which are
    `settings.refine_steps` (`us3d.registration.refine.RefinementSettings`; None: its defaults), and
    `depth_neighbours`: None (the default), or the keyword settings of
    `us3d.registration.layers.with_depth_neighbours` ({} for its own defaults), which then lets voxels
    next to a sliding interface take a depth neighbour's shift (off by default: on validation
    sequences it lowered the mean but raised the sliding set's mean and worst pair, at 30% more
    time); for studies of them (benchmarks/tune_registration.py, benchmarks/tune_depth_neighbours.py)."""

    def __init__(self, settings: RegistrationSettings = RegistrationSettings(),
                 refinement: RefinementSettings | None = None,
                 depth_neighbours: dict[str, float] | None = None) -> None:
        from us3d.registration.refine import RefinementSettings

        settings.check()
        self.settings = settings
        self.refinement = dataclasses.replace(refinement or RefinementSettings(), steps=settings.refine_steps)
        self.depth_neighbours = depth_neighbours
        self.device = resolve_device(settings.device)
        self._despeckle = self._despeckle_settings()
        self._network = None
        if settings.method == "voxelmorph":
            self._network = self._load_network()

    def _despeckle_settings(self):
        from us3d.despeckling import ObnlmSettings, UnetSettings

        name = self.settings.preprocessing
        return {"obnlm": ObnlmSettings(), "unet": UnetSettings(self.settings.unet_model)}.get(name)

    def _load_network(self) -> torch.nn.Module:
        from us3d.models.bundle import load_model

        loaded = load_model(self.settings.model or "voxelmorph", self.device)
        if loaded.metadata.get("task") != "registration":
            raise InputError(f"{loaded.name} is not a registration model")
        trained_on = loaded.metadata.get("preprocessing", [])
        if self.settings.preprocessing not in trained_on and self.settings.preprocessing != "gaussian":
            warnings.warn(f"{loaded.name} was trained on {', '.join(trained_on)} inputs, "
                          f"not {self.settings.preprocessing}")
        if self.device.type == "cpu":
            from us3d.registration.voxelmorph import for_inference

            return for_inference(loaded.module)
        return loaded.module

    # --- pre-processing ------------------------------------------------------------------------

    def preprocess(self, data: sitk.Image | VolumeSequence, cancel: Callable[[], bool] | None = None):
        """The volume or sequence as the registration sees it: float32, pre-processed."""
        from us3d.despeckling import despeckle

        name = self.settings.preprocessing
        if isinstance(data, VolumeSequence):
            if name == "none":
                return data.with_frames(data.frames.astype(np.float32))
            if name == "gaussian":
                return data.with_frames(np.stack([_gaussian_blur(f) for f in data.frames]))
            return despeckle(data, self._despeckle, self.settings.device, cancel=cancel)
        if name == "none":
            return sitk.Cast(data, sitk.sitkFloat32)
        if name == "gaussian":
            out = sitk.GetImageFromArray(_gaussian_blur(sitk.GetArrayViewFromImage(data)))
            out.CopyInformation(data)
            return out
        return despeckle(data, self._despeckle, self.settings.device, cancel=cancel)

    # --- the displacement ----------------------------------------------------------------------

    def _working_tensor(self, image: sitk.Image) -> torch.Tensor:
        """(1, 1, k, j, i) float32 on the device, on the working grid (`working_size`)."""
        volume = _tensor(image, self.device)
        size = working_size(list(volume.shape[2:]), _spacing_kji(image))
        # averaged down along the axes sampled finer than the network was trained on
        return volume if size == list(volume.shape[2:]) else F.interpolate(volume, size=size, mode="area")

    def prepare_moving(self, moving: sitk.Image) -> PreparedMoving:
        """What registering pre-processed `moving` to any fixed volume needs from it alone, made once
        for a moving volume registered to many frames (`register_sequence` does this): pass it to
        `displacement` and `field` as `prepared`."""
        from us3d.registration.voxelmorph import VoxelMorph

        with torch.inference_mode():
            tensor = self._working_tensor(moving)
            network = None
            if isinstance(self._network, VoxelMorph):  # a rebuilt network; a scripted one has no such method
                network = self._network.prepare_moving(tensor)
        return PreparedMoving(moving, tensor, network)

    def displacement(self, fixed: sitk.Image, moving: sitk.Image, initial: torch.Tensor | None = None,
                     cancel: Callable[[], bool] | None = None,
                     prepared: PreparedMoving | None = None) -> torch.Tensor:
        """(1, 3, k, j, i) voxel displacement, channels (k, j, i), that warps pre-processed `moving`
        (on the fixed grid) onto `fixed`; `initial` replaces the network's or translation's start
        (e.g. the previous frame's displacement); `prepared`: `prepare_moving(moving)`, the same
        result with less work. Not for demons."""
        from us3d.registration.layers import depth_axis, with_depth_neighbours, with_layer_translations
        from us3d.registration.refine import refine, resample_displacement
        from us3d.registration.voxelmorph import normalised, translation

        if prepared is not None and prepared.image is not moving:
            raise ValueError("prepared was made from another moving volume")
        fixed_t = self._working_tensor(fixed)
        moving_t = prepared.tensor if prepared is not None else self._working_tensor(moving)
        full, size = list(sitk.GetArrayViewFromImage(fixed).shape), list(fixed_t.shape[2:])
        spacing = tuple(s * n / m for s, n, m in zip(_spacing_kji(fixed), full, size))
        with torch.inference_mode():
            if initial is not None:
                start = resample_displacement(initial.to(self.device), size)
            elif self._network is not None:
                start = self._run_network(fixed_t, moving_t, None if prepared is None else prepared.network)
            else:
                shift = translation(normalised(fixed_t), normalised(moving_t))
                start = shift.view(1, 3, 1, 1, 1).expand(1, 3, *size).contiguous()
        if cancel is not None and cancel():
            raise Cancelled()
        if self.settings.refine_steps > 0:
            if initial is None:  # layers that slide over each other: each depth band's own translation
                with torch.inference_mode():
                    axis = depth_axis(fixed_t, spacing)
                    start = with_layer_translations(fixed_t, moving_t, start, spacing, axis)
                    if self.depth_neighbours is not None:
                        start = with_depth_neighbours(fixed_t, moving_t, start, spacing, axis, **self.depth_neighbours)
            with torch.enable_grad():
                start = refine(fixed_t, moving_t, start.clone(), spacing, self.refinement).detach()
        with torch.inference_mode():
            return resample_displacement(start, full)

    def _run_network(self, fixed: torch.Tensor, moving: torch.Tensor,
                     prepared: list[torch.Tensor] | None = None) -> torch.Tensor:
        try:
            return self._network(fixed, moving) if prepared is None else self._network(fixed, moving, prepared)
        except torch.cuda.OutOfMemoryError:
            if self.device.type != "cuda":
                raise
            warnings.warn("CUDA out of memory: registering on the CPU instead")
            self.device = torch.device("cpu")
            self._network = self._network.to(self.device)
            return self._network(fixed.cpu(), moving.cpu())

    def field(self, fixed: sitk.Image, moving: sitk.Image, initial: torch.Tensor | None = None,
              cancel: Callable[[], bool] | None = None,
              prepared: PreparedMoving | None = None) -> tuple[sitk.Image, torch.Tensor | None]:
        """(ITK displacement field on the fixed grid, LPS mm; the voxel displacement, None for demons)
        for pre-processed volumes on one grid; `prepared`: see `displacement`."""
        from us3d.registration.demons import register_demons

        if self.settings.method == "demons":
            return register_demons(fixed, moving, cancel=cancel), None
        displacement = self.displacement(fixed, moving, initial, cancel, prepared)
        return displacement_to_field(displacement[0].cpu().numpy(), fixed), displacement

    # --- pairs and sequences -------------------------------------------------------------------

    def _measure(self, fixed: sitk.Image, fixed_in: sitk.Image, moving: sitk.Image, moving_in: sitk.Image,
                 field: sitk.Image, displacement: torch.Tensor | None, seconds: float, truth: sitk.Image | None,
                 truth_mask: np.ndarray | None) -> PairResult:
        """The pair's figures; `displacement`: `field` in voxels (None for demons), which warps and
        gives the folding in compiled kernels (the same values as ITK's, several times faster)."""
        smpi = None
        if self.settings.preprocessing != "none":
            smpi = metrics.smpi(sitk.GetArrayViewFromImage(fixed).astype(np.float64),
                                sitk.GetArrayViewFromImage(fixed_in).astype(np.float64))
        voxels = None if displacement is None else displacement[0].float().cpu().numpy()
        before, after = intensity_mse(fixed_in, moving_in, field, voxels)
        if truth is not None and truth_mask is None:
            truth_mask = source_inside(truth, moving)
        epe = endpoint_error(field, truth, truth_mask) if truth is not None else None
        if voxels is None:
            warped, folding = warp(moving, field), folding_fraction(field)
        else:
            from us3d.registration.refine import jacobian_determinant

            warped = warp_voxels(moving, voxels)
            folding = float((jacobian_determinant(torch.from_numpy(voxels)[None]) <= 0).float().mean())
        return PairResult(field, warped, before, after, smpi, folding, seconds, epe)

    def register_pair(self, fixed: sitk.Image, moving: sitk.Image, truth: sitk.Image | None = None,
                      truth_mask: np.ndarray | None = None, cancel: Callable[[], bool] | None = None) -> PairResult:
        """Register `moving` onto `fixed` (resampled onto the fixed grid first when it lies on another
        grid); see PairResult. `truth`: the true field, for the endpoint error."""
        moving, resampled = on_fixed_grid(fixed, moving)
        fixed_in, moving_in = self.preprocess(fixed, cancel), self.preprocess(moving, cancel)
        start = time.perf_counter()
        field, displacement = self.field(fixed_in, moving_in, cancel=cancel)
        result = self._measure(fixed, fixed_in, moving, moving_in, field, displacement, time.perf_counter() - start,
                               truth, truth_mask)
        result.resampled = resampled
        return result

    def register_sequence(self, sequence: VolumeSequence, moving: int | sitk.Image = 0,
                          truths: Sequence[sitk.Image] | None = None,
                          progress: Callable[[int, int], None] | None = None,
                          cancel: Callable[[], bool] | None = None,
                          on_frame: Callable[[int, PairResult], None] | None = None) -> list[PairResult]:
        """The paper's protocol: the moving volume (a frame of `sequence`, by default frame 0, the
        exhale frame; or another volume) registered to every frame of `sequence` (a moving frame is
        registered to itself too, which gives a near-zero field).

        The sequence and the moving volume are pre-processed once; `truths`: the true field of each
        frame (frame t <- the moving volume), for endpoint errors. `progress(0, total)` once the
        inputs are pre-processed, `progress(done, total)` after each frame; `cancel()` returning
        True stops with `Cancelled`. `on_frame(t, result)` as soon as a frame is done; with it, the
        results returned keep only the figures (no field or warped volume), so memory does not grow
        with the frame count. The inputs are checked before the first frame is registered.
        """
        if len(sequence) == 0:
            raise InputError("the sequence has no frames")
        if isinstance(moving, (int, np.integer)):
            if not 0 <= moving < len(sequence):
                raise InputError(f"the moving frame must be between 0 and {len(sequence) - 1}, not {moving}")
            moving_image, resampled = sequence.frame_image(int(moving)), False
        else:
            moving_image, resampled = on_fixed_grid(sequence.frame_image(0), moving)
        if truths is not None and len(truths) != len(sequence):
            raise InputError(f"{len(truths)} true fields for {len(sequence)} frames")
        results = []
        for t, result in enumerate(self._frame_results(sequence, moving, moving_image, resampled, truths, progress,
                                                       cancel)):
            if on_frame is not None:
                on_frame(t, result)
                result = dataclasses.replace(result, field=None, warped=None)
            results.append(result)
        return results

    def _frame_results(self, sequence, moving, moving_image, resampled, truths, progress,
                       cancel) -> Iterator[PairResult]:
        prepared = self.preprocess(sequence, cancel)
        moving_in = self.preprocess(moving_image, cancel)
        # the moving volume's own share of the work (its working grid, translation spectra and
        # features), done once for every frame
        ready = None if self.settings.method == "demons" else self.prepare_moving(moving_in)
        if progress is not None:
            progress(0, len(sequence))
        previous = None
        for t in range(len(sequence)):
            if cancel is not None and cancel():
                raise Cancelled()
            fixed, fixed_in = sequence.frame_image(t), prepared.frame_image(t)
            start = time.perf_counter()
            field, displacement = self.field(fixed_in, moving_in, previous, cancel, ready)
            if self.settings.from_previous_frame and not (isinstance(moving, (int, np.integer)) and t == moving):
                previous = displacement  # None for demons
            result = self._measure(fixed, fixed_in, moving_image, moving_in, field, displacement,
                                   time.perf_counter() - start, None if truths is None else truths[t], None)
            result.resampled = resampled
            if progress is not None:
                progress(t + 1, len(sequence))
            yield result


def _gaussian_blur(volume: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """(k, j, i) volume blurred by a Gaussian of `sigma` voxels along every axis, float32."""
    image = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
    return sitk.GetArrayFromImage(sitk.DiscreteGaussian(image, variance=sigma ** 2, useImageSpacing=False))

