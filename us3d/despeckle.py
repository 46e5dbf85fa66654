"""Despeckling of SimpleITK volumes and 4D sequences, geometry kept, frame by frame.

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
from us3d.errors import InputError
from us3d.filters import obnlm
from us3d.io import VolumeSequence, to_image


class Cancelled(Exception):
    """The user cancelled a running job; nothing was produced."""


@dataclasses.dataclass(frozen=True)
class ObnlmSettings:
    """OBNLM parameters: mode, search radius M, block radius alpha, smoothing h."""

    mode: str = "slicewise"
    search_radius: int = 3
    block_radius: int = 1
    h: float = 0.7


@dataclasses.dataclass
class DespeckleResult:
    output: sitk.Image | VolumeSequence
    seconds_per_frame: list[float]
    device: str


def despeckle_array(volume: np.ndarray, settings: ObnlmSettings, device: str = "auto") -> np.ndarray:
    """Filtered (k, j, i) array, float32 (float64 for float64 input)."""
    out = obnlm(volume, settings.mode, settings.search_radius, settings.block_radius, settings.h, device)
    return out if volume.dtype == np.float64 else out.astype(np.float32)


def despeckle(data: sitk.Image | VolumeSequence, settings: ObnlmSettings | None = None, device: str = "auto",
              progress: Callable[[int, int], None] | None = None,
              cancel: Callable[[], bool] | None = None) -> DespeckleResult:
    """Despeckle a volume or every frame of a sequence; the input is left unchanged."""
    settings = settings or ObnlmSettings()
    used = resolve_device(device).type
    # Compile (or load the cached) kernel first, so that per-frame times are compute times.
    despeckle_array(np.ones((1, 4, 4), np.float32) * np.arange(4), settings, device)
    if isinstance(data, VolumeSequence):
        if len(data) == 0:
            raise InputError("the sequence has no frames")
        frames, times = [], []
        for index in range(len(data)):
            if cancel is not None and cancel():
                raise Cancelled()
            start = time.perf_counter()
            frames.append(despeckle_array(data.frames[index], settings, device))
            times.append(time.perf_counter() - start)
            if progress is not None:
                progress(index + 1, len(data))
        return DespeckleResult(data.with_frames(np.stack(frames)), times, used)
    if cancel is not None and cancel():
        raise Cancelled()
    start = time.perf_counter()
    array = despeckle_array(sitk.GetArrayViewFromImage(data), settings, device)
    seconds = time.perf_counter() - start
    if progress is not None:
        progress(1, 1)
    return DespeckleResult(to_image(array, data), [seconds], used)
