"""us3d: speckle reduction, registration, metrics and simulation for 3D/4D ultrasound (the logic
layer of the USDespeckle and USRegistration 3D Slicer modules). No Slicer, Qt or VTK imports here.

From Python::

    import us3d
    volume = us3d.read("liver.seq.nrrd")              # SimpleITK image, or a VolumeSequence for .seq.nrrd
    smooth = us3d.despeckle(volume, "unet")           # same kind back: array, image or sequence
    result = us3d.register(fixed, moving)             # SimpleITK images
    result.field, result.warped, result.mse_after     # ITK displacement field (LPS mm), warped moving
    us3d.metrics.smpi(original_array, smooth_array)   # the metrics, on numpy arrays

Many pairs with one network load: `us3d.Registrar(us3d.RegistrationSettings(...)).register_pair`.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Callable, Sequence

from us3d.options import DEFAULT_REFINE_STEPS

if TYPE_CHECKING:  # torch and SimpleITK load only when a function is called
    import numpy as np
    import SimpleITK as sitk

    from us3d.io import VolumeSequence
    from us3d.phantom import PhantomSequence
    from us3d.registration.pairs import PairResult

__version__ = "0.1.0"
__all__ = ["__version__", "read", "write", "despeckle", "register", "register_sequence", "simulate", "metrics",
           "Registrar", "RegistrationSettings"]


def __getattr__(name: str):
    if name == "metrics":  # imported on first use (it loads scikit-image)
        return importlib.import_module("us3d.metrics")
    if name in ("Registrar", "RegistrationSettings"):  # for many pairs: the network is loaded once
        return getattr(importlib.import_module("us3d.registration.pairs"), name)
    raise AttributeError(f"module 'us3d' has no attribute {name!r}")


def read(path: str | os.PathLike) -> "sitk.Image | VolumeSequence":
    """Read a volume (.nrrd .nhdr .nii .nii.gz .mha .mhd) as a `SimpleITK.Image`, or a 4D sequence
    (.seq.nrrd, as Slicer writes it) as a `us3d.io.VolumeSequence` (frames (t, k, j, i) + geometry).

    Examples
    --------
    >>> volume = us3d.read("liver.seq.nrrd")  # doctest: +SKIP
    >>> volume.frames.shape  # doctest: +SKIP
    (8, 32, 128, 128)
    """
    from us3d.io import read_volume_or_sequence

    return read_volume_or_sequence(path)


def write(data: "sitk.Image | VolumeSequence", path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write an image (any volume format) or a sequence (.seq.nrrd) atomically: a failed write leaves
    nothing behind. An existing file is refused unless `overwrite` is True. A displacement field (a
    3-vector image of float32, as `register` returns, or float64) is written in float32, as the CLI
    writes it.
    """
    from pathlib import Path

    import SimpleITK as sitk

    from us3d.errors import InputError
    from us3d.io import VolumeSequence, atomic_outputs, is_sequence_path, write_any
    from us3d.registration.fields import write_field

    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; choose a new file name or pass overwrite=True")
    if isinstance(data, VolumeSequence) != is_sequence_path(path):
        raise InputError("a sequence is written to a .seq.nrrd file, a volume to any other volume format")
    if not path.parent.is_dir():
        raise InputError(f"folder {path.parent} does not exist")
    with atomic_outputs([path]) as (temporary,):
        if isinstance(data, sitk.Image) and data.GetPixelID() in (sitk.sitkVectorFloat32, sitk.sitkVectorFloat64) \
                and data.GetNumberOfComponentsPerPixel() == 3:
            write_field(data, temporary)
        else:
            write_any(data, temporary)


def despeckle(volume: "np.ndarray | sitk.Image | VolumeSequence", method: str = "obnlm", *, device: str = "auto",
              model: str | None = None, mode: str | None = None, search_radius: int | None = None,
              block_radius: int | None = None, h: float | None = None,
              progress: Callable[[int, int], None] | None = None,
              cancel: Callable[[], bool] | None = None,
              on_frame: "Callable[[int, np.ndarray], None] | None" = None) -> "np.ndarray | sitk.Image | VolumeSequence | None":
    """Despeckle a volume or every frame of a 4D sequence; the input is never modified.

    Parameters
    ----------
    volume : numpy array (k, j, i) or (t, k, j, i), SimpleITK.Image, or us3d.io.VolumeSequence
        B-mode grey levels; k is the elevation (slice) axis, (j, i) the B-mode plane.
    method : {"obnlm", "unet"}
        "obnlm": the OBNLM filter (Coupe et al. 2009); "unet": a trained 3D dense U-Net.
    device : {"auto", "cpu", "cuda"}
    model : str, optional
        U-Net only: a bundled model name ("unet-obnlm", the default, reproduces OBNLM; "unet-sim"
        estimates the speckle-free echogenicity) or a .pt file.
    mode : {"slicewise", "3d"}, optional
        OBNLM only: each k-slice in 2D as the public implementation does (default), or 3D blocks.
    search_radius : int, optional
        OBNLM only: M, half-size of the search window in voxels (default 3).
    block_radius : int, optional
        OBNLM only: alpha, half-size of the compared blocks in voxels (default 1).
    h : float, optional
        OBNLM only: the smoothing parameter h (default 0.7).
    progress : callable, optional
        progress(0, total) once the filter is ready (model loaded, kernel compiled), then
        progress(frames_done, total) after each frame (`us3d.despeckling.FrameTimer` times frames).
    cancel : callable, optional
        Returning True stops the run with `us3d.errors.Cancelled`.
    on_frame : callable, optional
        Sequences only: on_frame(t, frame) with each despeckled frame ((k, j, i) float32) as soon
        as it is made, in order; nothing is kept and None is returned, so memory does not grow with
        the number of frames (`us3d.io.SequenceWriter.write` streams them into a .seq.nrrd).

    Returns
    -------
    The same kind as `volume`: a float32 array of the same shape, an image with the same geometry,
    or a sequence with the same frames and index values (None with `on_frame`).

    Examples
    --------
    >>> import numpy as np, us3d
    >>> volume = np.random.default_rng(0).rayleigh(40.0, (8, 64, 64)).astype(np.float32)
    >>> us3d.despeckle(volume).shape
    (8, 64, 64)
    >>> smooth = us3d.despeckle(volume, "unet", model="unet-obnlm")  # doctest: +SKIP
    """
    import numpy as np
    import SimpleITK as sitk

    from us3d.despeckling import despeckle as despeckle_data, settings_from_arguments
    from us3d.errors import InputError
    from us3d.io import VolumeSequence

    settings = settings_from_arguments(method, model, mode, search_radius, block_radius, h)
    array = None if isinstance(volume, (sitk.Image, VolumeSequence)) else np.asarray(volume)
    if on_frame is not None and not (isinstance(volume, VolumeSequence) or (array is not None and array.ndim == 4)):
        raise InputError("on_frame is for sequences: a (t, k, j, i) array or a VolumeSequence")
    if array is None:
        return despeckle_data(volume, settings, device, progress, cancel, on_frame)
    if array.ndim == 3:
        image = sitk.GetImageFromArray(array)
        return sitk.GetArrayFromImage(despeckle_data(image, settings, device, progress, cancel))
    if array.ndim == 4:
        out = despeckle_data(VolumeSequence(array), settings, device, progress, cancel, on_frame)
        return None if out is None else out.frames
    raise InputError(f"volume must be a (k, j, i) or (t, k, j, i) array, an image or a sequence, not a "
                     f"{array.ndim}-dimensional array")


def simulate(frames: int = 8, seed: int = 0, *, conditions: str = "standard",
             progress: Callable[[int, int], None] | None = None) -> "PhantomSequence":
    """Simulate a 4D B-mode liver sequence with breathing motion and its ground truth.

    Parameters
    ----------
    frames : int
        Number of frames; frame 0 is the exhale (reference) frame.
    seed : int
        Anatomy, scatterers and (for varied conditions) imaging and breathing are drawn from it.
    conditions : {"standard", "varied", "sliding"}
        "standard": 128x128x32 voxels of 0.4x0.3x0.8 mm (i, j, k), one probe configuration;
        "varied": imaging and breathing drawn from wide ranges, depth along i half of the time;
        "sliding": varied imaging, 16 mm breathing under a wall that does not follow.

    Returns
    -------
    us3d.phantom.PhantomSequence
        `.bmode` (t, k, j, i) uint8, `.echogenicity` (speckle-free truth), `.labels`,
        `.displacement` (t, k, j, i, 3) in mm, (x, y, z): frame t's voxel came from x + d in frame 0;
        `.to_sequence()` gives the B-mode as a `VolumeSequence`.

    Examples
    --------
    >>> phantom = us3d.simulate(3, seed=1)  # doctest: +SKIP
    >>> phantom.bmode.shape  # doctest: +SKIP
    (3, 32, 128, 128)
    """
    from us3d.phantom.varied import simulate_conditions

    return simulate_conditions(conditions, frames, seed, progress)


def register(fixed: "sitk.Image", moving: "sitk.Image", *, method: str = "voxelmorph", preprocessing: str = "none",
             refine_steps: int = DEFAULT_REFINE_STEPS, device: str = "auto", model: str | None = None,
             unet_model: str = "unet-obnlm", truth: "sitk.Image | None" = None,
             cancel: Callable[[], bool] | None = None) -> "PairResult":
    """Register `moving` onto `fixed` (deformable, 3D).

    Parameters
    ----------
    fixed, moving : SimpleITK.Image
        3D grey-level volumes; a moving volume on another grid is resampled onto the fixed grid
        first (`result.resampled` says so).
    method : {"voxelmorph", "translation", "demons"}
        "voxelmorph": the bundled network, then `refine_steps` steps of per-pair refinement;
        "translation": an FFT translation, then the same refinement (no network);
        "demons": SimpleITK's multi-resolution diffeomorphic demons.
    preprocessing : {"none", "gaussian", "obnlm", "unet"}
        Applied to both volumes before registering (the field is applied to the original moving volume).
    refine_steps : int
        Adam steps of refinement; 0 gives the pure network, as in the VoxelMorph paper.
    device : {"auto", "cpu", "cuda"}
    model : str, optional
        A VoxelMorph model name or .pt file instead of the bundled one.
    unet_model : str
        The U-Net (name or .pt file) used when `preprocessing` is "unet".
    truth : SimpleITK.Image, optional
        The true displacement field, for `result.endpoint_error` (mean, p95; mm).
    cancel : callable, optional
        Returning True stops the run with `us3d.errors.Cancelled`.

    Returns
    -------
    us3d.registration.pairs.PairResult
        `.field`: ITK displacement field on the fixed grid (LPS, mm; 3-vectors of float32, demons
        float64): warped(x) = moving(x + field(x)); `sitk.DisplacementFieldTransform` needs it cast
        to float64 (`us3d.registration.fields.warp` does this);
        `.warped`: the moving volume on the fixed grid; `.mse_before`, `.mse_after`, `.folding`
        (fraction of voxels), `.seconds`.

    Each call loads the network; to register many pairs, make one `us3d.Registrar` and call its
    `register_pair` (the same settings, as a `us3d.RegistrationSettings`).

    Examples
    --------
    >>> import SimpleITK as sitk, us3d
    >>> fixed, moving = sitk.ReadImage("frame3.nrrd"), sitk.ReadImage("frame0.nrrd")  # doctest: +SKIP
    >>> result = us3d.register(fixed, moving)  # doctest: +SKIP
    >>> sitk.WriteImage(result.field, "field.mha")  # Slicer loads it as a transform  # doctest: +SKIP
    """
    from us3d.registration.pairs import Registrar, RegistrationSettings

    settings = RegistrationSettings(method, preprocessing, refine_steps, device, model, unet_model)
    return Registrar(settings).register_pair(fixed, moving, truth, cancel=cancel)


def register_sequence(sequence: "VolumeSequence", moving_frame: "int | sitk.Image" = 0, *, method: str = "voxelmorph",
                      preprocessing: str = "none", refine_steps: int = DEFAULT_REFINE_STEPS, device: str = "auto",
                      model: str | None = None, unet_model: str = "unet-obnlm",
                      truths: "Sequence[sitk.Image] | None" = None,
                      progress: Callable[[int, int], None] | None = None,
                      cancel: Callable[[], bool] | None = None,
                      on_frame: "Callable[[int, PairResult], None] | None" = None) -> "list[PairResult]":
    """The paper's protocol on a 4D sequence: the moving volume (frame `moving_frame`, the exhale
    frame, or a volume from outside the sequence) registered to every frame; one `PairResult` per
    frame (see `register` for the settings).

    Parameters
    ----------
    sequence : us3d.io.VolumeSequence
        The fixed frames (`us3d.read("x.seq.nrrd")`).
    moving_frame : int or SimpleITK.Image
        The paper's reference frame: an index into `sequence` (default 0), or a volume (resampled
        onto the frames' grid if it lies on another).
    truths : sequence of SimpleITK.Image, optional
        The true field of each frame (frame t <- the moving volume), for endpoint errors.
    progress : callable, optional
        progress(0, total) once the inputs are pre-processed, then progress(done, total) after each frame.
    cancel : callable, optional
        Returning True stops the run with `us3d.errors.Cancelled`.
    on_frame : callable, optional
        on_frame(t, result) as soon as frame t is registered. With it, the returned results keep
        only the figures (`field` and `warped` are None), so memory does not grow with the number
        of frames: write or use each frame's field and warped volume in `on_frame`.

    Examples
    --------
    >>> results = us3d.register_sequence(us3d.read("liver.seq.nrrd"))  # doctest: +SKIP
    >>> [r.mse_after for r in results]  # doctest: +SKIP
    """
    from us3d.registration.pairs import Registrar, RegistrationSettings

    settings = RegistrationSettings(method, preprocessing, refine_steps, device, model, unet_model)
    return Registrar(settings).register_sequence(sequence, moving_frame, truths, progress, cancel, on_frame)
