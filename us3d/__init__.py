"""us3d: speckle reduction, registration, metrics and simulation for 3D/4D ultrasound (the logic
layer of the USDespeckle and USRegistration 3D Slicer modules). No Slicer, Qt or VTK imports here.

Registration from Python::

    import us3d
    result = us3d.register(fixed, moving)            # SimpleITK images
    result.field, result.warped, result.mse_after    # ITK displacement field (LPS mm), warped moving
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from us3d.options import DEFAULT_REFINE_STEPS

if TYPE_CHECKING:  # torch and SimpleITK load only when a function is called
    import SimpleITK as sitk

    from us3d.io import VolumeSequence
    from us3d.registration.pairs import PairResult

__version__ = "0.1.0"
__all__ = ["__version__", "register", "register_sequence"]


def register(fixed: "sitk.Image", moving: "sitk.Image", *, method: str = "voxelmorph", preprocessing: str = "none",
             refine_steps: int = DEFAULT_REFINE_STEPS, device: str = "auto", model: str | None = None,
             truth: "sitk.Image | None" = None) -> "PairResult":
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
    truth : SimpleITK.Image, optional
        The true displacement field, for `result.endpoint_error` (mean, p95; mm).

    Returns
    -------
    us3d.registration.pairs.PairResult
        `.field`: ITK displacement field on the fixed grid (LPS, mm): warped(x) = moving(x + field(x));
        `.warped`: the moving volume on the fixed grid; `.mse_before`, `.mse_after`, `.folding`
        (fraction of voxels), `.seconds`.

    Examples
    --------
    >>> import SimpleITK as sitk, us3d
    >>> fixed, moving = sitk.ReadImage("frame3.nrrd"), sitk.ReadImage("frame0.nrrd")  # doctest: +SKIP
    >>> result = us3d.register(fixed, moving)  # doctest: +SKIP
    >>> sitk.WriteImage(result.field, "field.mha")  # Slicer loads it as a transform  # doctest: +SKIP
    """
    from us3d.registration.pairs import Registrar, RegistrationSettings

    settings = RegistrationSettings(method, preprocessing, refine_steps, device, model)
    return Registrar(settings).register_pair(fixed, moving, truth)


def register_sequence(sequence: "VolumeSequence", moving_frame: int = 0, *, method: str = "voxelmorph",
                      preprocessing: str = "none", refine_steps: int = DEFAULT_REFINE_STEPS, device: str = "auto",
                      model: str | None = None, truths: "list[sitk.Image] | None" = None,
                      progress: Callable[[int, int], None] | None = None,
                      cancel: Callable[[], bool] | None = None) -> "list[PairResult]":
    """The paper's protocol on a 4D sequence: frame `moving_frame` (the exhale frame) registered to
    every frame; one `PairResult` per frame (see `register` for the settings).

    `sequence` is a `us3d.io.VolumeSequence` (`us3d.io.read_sequence("x.seq.nrrd")`); `truths`: the
    true field of each frame, for endpoint errors; `progress(done, total)` after each frame;
    `cancel()` returning True stops with `us3d.errors.Cancelled`.

    Examples
    --------
    >>> from us3d.io import read_sequence
    >>> results = us3d.register_sequence(read_sequence("liver.seq.nrrd"))  # doctest: +SKIP
    >>> [r.mse_after for r in results]  # doctest: +SKIP
    """
    from us3d.registration.pairs import Registrar, RegistrationSettings

    settings = RegistrationSettings(method, preprocessing, refine_steps, device, model)
    return Registrar(settings).register_sequence(sequence, moving_frame, truths, progress, cancel)
