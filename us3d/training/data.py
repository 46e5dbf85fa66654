"""Training and held-out volumes for the despeckling U-Net.

Training sources (`training_sources`):

- simulated liver volumes (`us3d.phantom`): the project's standard configuration and, for most of
  them, imaging drawn from wide ranges (`us3d.phantom.varied.varied_setup`: PSF widths, centre
  frequency, bandwidth, scatterer density down to speckle that is not fully developed, dynamic range
  40-70 dB, gain, noise floor, attenuation with TGC, sector geometry with a zero outside);
- for the "obnlm" target, every real B-mode source in Resources/SampleData except the held-out
  MouseLiverB: the spine-phantom reconstruction, the 21 freehand spine frames, the Ultrasonix and BK
  curvilinear scan-converted frames, and the mouse-liver RF turned into B-mode (`rf_to_bmode`).

The "obnlm" target needs no truth: it is computed on every augmented training crop (see
`us3d.training.despeckle`), so sources carry only their input. The "clean" target (the simulator's
speckle-free echogenicity) exists only in simulation.

Held-out sets (`validation_set`), never trained on: standard simulator seeds VALIDATION_SEEDS, varied
simulator seeds VARIED_VALIDATION_SEEDS, and (OBNLM target) the real MouseLiverB volume, each in both
in-plane orientations (as simulated, and with j and i swapped).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from us3d import __version__
from us3d.despeckling import ObnlmSettings, despeckle_array
from us3d.phantom import PhantomSequence, simulate_sequence
from us3d.phantom.varied import varied_setup
from us3d.resources import sample_data

TARGETS = ("obnlm", "clean")
TRAINING_SEED_START = 1000
VARIED_TRAINING_SEED_START = 5000
VALIDATION_SEEDS = (9000, 9001, 9002, 9003)
VARIED_VALIDATION_SEEDS = (9500, 9501, 9502, 9503, 9504, 9505)
#: Real B-mode sources trained on (OBNLM target); MouseLiverB (REAL_VALIDATION) stays held out.
REAL_TRAINING = ("SpinePhantomFreehandReconstructed.mha", "SpinePhantomFreehand.igs.mha",
                 "UltrasonixCurvilinearScanConvertedData.igs.mha", "BkCurvilinearScanConvertedData.igs.mha",
                 "MouseLiverRF.mha")
REAL_VALIDATION = "MouseLiverB.mha"


@dataclasses.dataclass
class TrainingVolume:
    """One (k, j, i) input volume, its target where one is stored, and where there is signal."""

    name: str
    input: np.ndarray  # float32
    target: np.ndarray | None = None  # float32, same grid; None where the target is computed per crop
    valid: np.ndarray | None = None  # bool mask of voxels with data (e.g. inside a freehand sweep)


def _cached(cache: Path | None, key: dict, make: Callable[[], list[TrainingVolume]]) -> list[TrainingVolume]:
    if cache is None:
        return make()
    digest = hashlib.sha256(json.dumps(dict(key, us3d=__version__), sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"{key['kind']}-{digest}.npz"
    if path.exists():
        with np.load(path) as stored:
            count = int(stored["count"])
            return [TrainingVolume(str(stored[f"name{n}"]), stored[f"input{n}"],
                                   stored[f"target{n}"] if f"target{n}" in stored else None,
                                   stored[f"valid{n}"] if f"valid{n}" in stored else None) for n in range(count)]
    volumes = make()
    cache.mkdir(parents=True, exist_ok=True)
    arrays = {"count": np.array(len(volumes))}
    for n, volume in enumerate(volumes):
        arrays.update({f"name{n}": np.array(volume.name), f"input{n}": volume.input})
        for field in ("target", "valid"):
            if getattr(volume, field) is not None:
                arrays[f"{field}{n}"] = getattr(volume, field)
    temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # DDP ranks may write at once
    np.savez(temporary, **arrays)
    temporary.replace(path)
    return volumes


def simulate_source(seed: int, varied: bool, frames: int = 1) -> PhantomSequence:
    """A simulated sequence: the standard configuration, or imaging drawn from `seed` (varied)."""
    setup = varied_setup(np.random.default_rng([seed, 4099])) if varied else None
    return simulate_sequence(frames, seed, setup)


def simulated_volumes(seeds: list[int], frames: int, target: str, varied: bool = False,
                      cache: Path | None = None) -> list[TrainingVolume]:
    """Every frame of one simulated sequence per seed; with the clean target stored for "clean"."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}")
    volumes = []
    for seed in seeds:
        key = {"kind": "sim", "seed": seed, "frames": frames, "varied": varied, "clean": target == "clean"}

        def make(seed=seed) -> list[TrainingVolume]:
            phantom = simulate_source(seed, varied, frames)
            kind = "varied" if varied else "standard"
            return [TrainingVolume(f"{kind} phantom seed {seed} frame {t}", phantom.bmode[t].astype(np.float32),
                                   phantom.echogenicity[t].astype(np.float32) if target == "clean" else None)
                    for t in range(frames)]

        volumes += _cached(cache, key, make)
    return volumes


def rf_to_bmode(rf: np.ndarray, axis: int = -1, dynamic_range_db: float = 55.0, decimation: int = 2) -> np.ndarray:
    """8-bit B-mode from RF lines along `axis`: Hilbert envelope, decimated, log-compressed over
    `dynamic_range_db` below the 99.9th percentile."""
    from scipy.signal import hilbert

    envelope = np.abs(hilbert(rf.astype(np.float64), axis=axis))
    envelope = np.take(envelope, np.arange(0, envelope.shape[axis], decimation), axis=axis)
    db = 20 * np.log10(np.maximum(envelope, 1e-12) / np.percentile(envelope, 99.9))
    return np.clip(np.round((db + dynamic_range_db) / dynamic_range_db * 255), 0, 255).astype(np.float32)


def read_real(name: str) -> np.ndarray:
    """A bundled real source as a float32 (k, j, i) B-mode array (2D images get k = 1; RF becomes B-mode)."""
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data(name))))
    if array.ndim == 2:
        array = array[None]
    if name == "MouseLiverRF.mha":  # RF lines along i
        return rf_to_bmode(array, axis=2)
    return array.astype(np.float32)


def real_volume(name: str, settings: ObnlmSettings | None = None, cache: Path | None = None) -> TrainingVolume:
    """A bundled real B-mode source, with its whole-volume OBNLM output as target when `settings` is
    given; `valid` marks non-empty voxels."""
    key = {"kind": "real", "name": name, "obnlm": dataclasses.asdict(settings) if settings else None}

    def make() -> list[TrainingVolume]:
        volume = read_real(name)
        target = despeckle_array(volume, settings, "cpu") if settings else None
        return [TrainingVolume(name, volume, target, volume > 0)]

    return _cached(cache, key, make)[0]


def training_sources(target: str, standard: int, varied: int, include_real: bool = True,
                     cache: Path | None = None) -> list[TrainingVolume]:
    """Training sources: `standard` + `varied` simulated volumes (one frame each) and, for the OBNLM
    target, the real sources REAL_TRAINING."""
    volumes = simulated_volumes(list(range(TRAINING_SEED_START, TRAINING_SEED_START + standard)), 1, target,
                                False, cache)
    volumes += simulated_volumes(list(range(VARIED_TRAINING_SEED_START, VARIED_TRAINING_SEED_START + varied)), 1,
                                 target, True, cache)
    if include_real and target == "obnlm":
        volumes += [real_volume(name, None, cache) for name in REAL_TRAINING]
    return volumes


def transposed(volume: TrainingVolume) -> TrainingVolume:
    """The volume with its in-plane axes j and i swapped."""
    def swap(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else np.ascontiguousarray(np.swapaxes(array, 1, 2))

    return TrainingVolume(volume.name + " (j, i swapped)", swap(volume.input), swap(volume.target), swap(volume.valid))


def validation_set(target: str, settings: ObnlmSettings, cache: Path | None = None) -> list[TrainingVolume]:
    """Held-out volumes with stored targets, in both in-plane orientations: standard and varied
    simulator seeds never trained on, and (OBNLM target) MouseLiverB."""
    volumes = simulated_volumes(list(VALIDATION_SEEDS), 1, target, False, cache)
    volumes += simulated_volumes(list(VARIED_VALIDATION_SEEDS), 1, target, True, cache)
    if target == "obnlm":
        volumes.append(real_volume(REAL_VALIDATION, None, cache))
    volumes += [transposed(volume) for volume in volumes]
    if target == "obnlm":  # OBNLM of each orientation itself, as a user would get it
        key = {"kind": "validation-obnlm", "names": [v.name for v in volumes], "obnlm": dataclasses.asdict(settings)}
        targets = _cached(cache, key, lambda: [TrainingVolume(v.name, despeckle_array(v.input, settings, "cpu"))
                                               for v in volumes])
        volumes = [dataclasses.replace(v, target=t.input) for v, t in zip(volumes, targets)]
    return volumes
