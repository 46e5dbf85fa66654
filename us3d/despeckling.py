"""Despeckling of SimpleITK volumes and 4D sequences, geometry kept, frame by frame.

Two methods: OBNLM (`ObnlmSettings`) and the 3D dense U-Net (`UnetSettings`, a bundled model
by name or a model file).

The frame loop takes a progress callback (called with frames done, total) and a cancel
callback (returning True stops the run with `Cancelled`, and nothing is returned).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import SimpleITK as sitk

from us3d.devices import resolve_device
from us3d.errors import Cancelled, InputError  # noqa: F401  (Cancelled is part of this API)
from us3d.filters import obnlm
from us3d.io import VolumeSequence, to_image


@dataclasses.dataclass(frozen=True)
class ObnlmSettings:
    """OBNLM parameters: mode, search radius M, block radius alpha, smoothing h."""

    mode: str = "slicewise"
    search_radius: int = 3
    block_radius: int = 1
    h: float = 0.7


@dataclasses.dataclass(frozen=True)
class UnetSettings:
    """U-Net despeckling: a bundled model name (see `us3d.models.bundle`) or a .pt file."""

    model: str = "unet-obnlm"


@dataclasses.dataclass
class DespeckleResult:
    output: sitk.Image | VolumeSequence
    seconds_per_frame: list[float]
    device: str


def despeckle_array(volume: np.ndarray, settings: ObnlmSettings, device: str = "auto") -> np.ndarray:
    """Filtered (k, j, i) array, float32 (float64 for float64 input)."""
    out = obnlm(volume, settings.mode, settings.search_radius, settings.block_radius, settings.h, device)
    return out if volume.dtype == np.float64 else out.astype(np.float32)


def _frame_runner(settings: ObnlmSettings | UnetSettings, device: str) -> tuple[Callable, int, str]:
    """(function from (t, k, j, i) frames to filtered frames, frames per call, device type)."""
    used = resolve_device(device)
    if isinstance(settings, UnetSettings):
        from us3d.models.bundle import load_model
        from us3d.models.inference import predict

        model = load_model(settings.model, used)
        mapping = model.input_mapping
        predict(model.module, np.zeros((1, 4, 16, 16), np.float32), used, mapping=mapping)  # first call compiles
        return ((lambda frames: predict(model.module, frames, used, mapping=mapping)), (8 if used.type == "cuda" else 1),
                used.type)
    # Compile (or load the cached) kernel first, so that per-frame times are compute times.
    despeckle_array(np.ones((1, 4, 4), np.float32) * np.arange(4), settings, device)
    return (lambda frames: np.stack([despeckle_array(f, settings, device) for f in frames])), 1, used.type


def despeckle(data: sitk.Image | VolumeSequence, settings: ObnlmSettings | UnetSettings | None = None,
              device: str = "auto", progress: Callable[[int, int], None] | None = None,
              cancel: Callable[[], bool] | None = None) -> DespeckleResult:
    """Despeckle a volume or every frame of a sequence; the input is left unchanged.

    Frames are filtered one at a time (U-Net on CUDA: 8 at a time); `progress(done, total)`
    is called after each, and `cancel()` returning True stops the run with `Cancelled`.
    """
    settings = settings or ObnlmSettings()
    run, chunk, used = _frame_runner(settings, device)
    if isinstance(data, VolumeSequence):
        if len(data) == 0:
            raise InputError("the sequence has no frames")
        # one output array filled frame by frame: memory holds the input and the output, nothing more
        frames, times = np.empty(data.frames.shape, np.float32), []
        for index in range(0, len(data), chunk):
            if cancel is not None and cancel():
                raise Cancelled()
            start = time.perf_counter()
            filtered = run(data.frames[index:index + chunk])
            times += [(time.perf_counter() - start) / len(filtered)] * len(filtered)
            frames[index:index + len(filtered)] = filtered
            if progress is not None:
                progress(index + len(filtered), len(data))
        return DespeckleResult(data.with_frames(frames), times, used)
    if cancel is not None and cancel():
        raise Cancelled()
    start = time.perf_counter()
    array = run(sitk.GetArrayViewFromImage(data)[None])[0].astype(np.float32, copy=False)
    seconds = time.perf_counter() - start
    if progress is not None:
        progress(1, 1)
    return DespeckleResult(to_image(array, data), [seconds], used)
