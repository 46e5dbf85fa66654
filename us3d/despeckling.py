"""Despeckling of SimpleITK volumes and 4D sequences, geometry kept, frame by frame: the
implementation behind `us3d.despeckle`.

Two methods: OBNLM (`ObnlmSettings`) and the 3D dense U-Net (`UnetSettings`, a bundled model
by name or a model file); `settings.arguments()` gives the same choice as `us3d.despeckle`'s
keyword arguments.

The frame loop takes a progress callback, called with (0, total) once the filter is ready (model
loaded, kernel compiled) and with (frames done, total) after each frame, so `FrameTimer` can time
the frames alone; and a cancel callback (returning True stops the run with `Cancelled`, and
nothing is returned).
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

    def arguments(self) -> dict:
        """`us3d.despeckle`'s method and keyword arguments for these settings."""
        return dict(method="obnlm", **dataclasses.asdict(self))

    def description(self) -> str:
        return f"OBNLM {self.mode} M={self.search_radius} alpha={self.block_radius} h={self.h:g}"


@dataclasses.dataclass(frozen=True)
class UnetSettings:
    """U-Net despeckling: a bundled model name (see `us3d.models.bundle`) or a .pt file."""

    model: str = "unet-obnlm"

    def arguments(self) -> dict:
        """`us3d.despeckle`'s method and keyword arguments for these settings."""
        return {"method": "unet", "model": self.model}

    def description(self) -> str:
        return f"U-Net {self.model}"


def settings_from_arguments(method: str = "obnlm", model: str | None = None, mode: str | None = None,
                            search_radius: int | None = None, block_radius: int | None = None,
                            h: float | None = None) -> ObnlmSettings | UnetSettings:
    """The settings object for `us3d.despeckle`'s method and keyword arguments (InputError for
    arguments of the other method or an unknown method)."""
    from us3d.options import DESPECKLE_METHODS

    obnlm = {"mode": mode, "search_radius": search_radius, "block_radius": block_radius, "h": h}
    if method == "obnlm":
        if model is not None:
            raise InputError("model applies to method='unet'")
        return ObnlmSettings(**{k: v for k, v in obnlm.items() if v is not None})
    if method == "unet":
        given = [k for k, v in obnlm.items() if v is not None]
        if given:
            raise InputError(f"{', '.join(given)} apply to method='obnlm'")
        return UnetSettings(model or UnetSettings.model)
    raise InputError(f"method must be one of {', '.join(DESPECKLE_METHODS)}, not {method!r}")


class FrameTimer:
    """A progress callback that records the seconds of each frame (`seconds_per_frame`) from the
    calls `despeckle` makes: (0, total) when the filter is ready, then after each frame or batch of
    frames (a batch's time is shared by its frames). `then(done, total)` is called after it."""

    def __init__(self, then: Callable[[int, int], None] | None = None) -> None:
        self.then = then
        self.seconds_per_frame: list[float] = []
        self._last: tuple[float, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self._last is not None and done > self._last[1]:
            count = done - self._last[1]
            self.seconds_per_frame += [(now - self._last[0]) / count] * count
        self._last = (now, done)
        if self.then is not None:
            self.then(done, total)


def despeckle_array(volume: np.ndarray, settings: ObnlmSettings, device: str = "auto") -> np.ndarray:
    """Filtered (k, j, i) array, float32 (float64 for float64 input)."""
    out = obnlm(volume, settings.mode, settings.search_radius, settings.block_radius, settings.h, device)
    return out if volume.dtype == np.float64 else out.astype(np.float32)


def _frame_runner(settings: ObnlmSettings | UnetSettings, device: str) -> tuple[Callable, int]:
    """(function from (t, k, j, i) frames to filtered frames, frames per call)."""
    used = resolve_device(device)
    if isinstance(settings, UnetSettings):
        from us3d.models.bundle import load_model
        from us3d.models.inference import predict
        from us3d.models.unet import for_inference

        model = load_model(settings.model, used)
        mapping = model.input_mapping
        # on the CPU: oneDNN channels-last, in bfloat16 where the CPU has it natively (half the time)
        module = for_inference(model.module) if used.type == "cpu" else model.module
        predict(module, np.zeros((1, 4, 16, 16), np.float32), used, mapping=mapping)  # first call compiles
        return (lambda frames: predict(module, frames, used, mapping=mapping)), (8 if used.type == "cuda" else 1)
    # Compile (or load the cached) kernel first, so that per-frame times are compute times.
    despeckle_array(np.ones((1, 4, 4), np.float32) * np.arange(4), settings, device)
    return (lambda frames: np.stack([despeckle_array(f, settings, device) for f in frames])), 1


def despeckle(data: sitk.Image | VolumeSequence, settings: ObnlmSettings | UnetSettings | None = None,
              device: str = "auto", progress: Callable[[int, int], None] | None = None,
              cancel: Callable[[], bool] | None = None,
              on_frame: Callable[[int, np.ndarray], None] | None = None) -> sitk.Image | VolumeSequence | None:
    """Despeckle a volume or every frame of a sequence (see `us3d.despeckle`); the input is left
    unchanged.

    Frames are filtered one at a time (U-Net on CUDA: 8 at a time); `progress(0, total)` is
    called once the filter is ready and `progress(done, total)` after each frame; `cancel()`
    returning True stops the run with `Cancelled`. For a sequence, `on_frame(t, frame)` receives
    each despeckled frame ((k, j, i) float32) as soon as it is made, in order; then no output is
    kept and None is returned, so memory does not grow with the frame count.
    """
    settings = settings or ObnlmSettings()
    if isinstance(data, VolumeSequence) and len(data) == 0:
        raise InputError("the sequence has no frames")
    run, chunk = _frame_runner(settings, device)
    total = len(data) if isinstance(data, VolumeSequence) else 1
    if progress is not None:
        progress(0, total)
    if isinstance(data, VolumeSequence):
        # one output array filled frame by frame (memory holds the input and the output), or
        # each frame handed on as it is made
        frames = np.empty(data.frames.shape, np.float32) if on_frame is None else None
        for index in range(0, total, chunk):
            if cancel is not None and cancel():
                raise Cancelled()
            filtered = run(data.frames[index:index + chunk])
            if frames is None:
                for offset, frame in enumerate(filtered):
                    on_frame(index + offset, np.asarray(frame, np.float32))
            else:
                frames[index:index + len(filtered)] = filtered
            if progress is not None:
                progress(index + len(filtered), total)
        return None if frames is None else data.with_frames(frames)
    if cancel is not None and cancel():
        raise Cancelled()
    array = run(sitk.GetArrayViewFromImage(data)[None])[0].astype(np.float32, copy=False)
    if progress is not None:
        progress(1, 1)
    return to_image(array, data)
