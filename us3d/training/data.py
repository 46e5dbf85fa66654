"""Training and validation volumes for the despeckling U-Net, with their targets.

Simulated liver sequences (`us3d.phantom`, one seed per sequence) give input B-mode frames
and two possible targets: the OBNLM output ("obnlm") or the speckle-free echogenicity
("clean"). The real spine-phantom volume is added for the OBNLM target (it has no clean
truth). Held-out validation: simulator seeds from VALIDATION_SEEDS (never used for
training) and the real MouseLiverB volume. Volumes are cached as .npz files, keyed by
everything that determines them, so repeated runs do not recompute OBNLM.
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
from us3d.despeckle import ObnlmSettings, despeckle_array
from us3d.phantom import simulate_sequence
from us3d.resources import sample_data

TARGETS = ("obnlm", "clean")
TRAINING_SEED_START = 1000
VALIDATION_SEEDS = (9000, 9001, 9002, 9003)
REAL_TRAINING = "SpinePhantomFreehandReconstructed.mha"
REAL_VALIDATION = "MouseLiverB.mha"


@dataclasses.dataclass
class TrainingVolume:
    """One (k, j, i) input volume, its target and, for crops, where there is signal."""

    name: str
    input: np.ndarray  # float32
    target: np.ndarray  # float32, same grid
    valid: np.ndarray | None = None  # bool mask of voxels with data (e.g. inside a freehand sweep)


def _cached(cache: Path | None, key: dict, make: Callable[[], list[TrainingVolume]]) -> list[TrainingVolume]:
    if cache is None:
        return make()
    digest = hashlib.sha256(json.dumps(dict(key, us3d=__version__), sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"{key['kind']}-{digest}.npz"
    if path.exists():
        with np.load(path) as stored:
            count = int(stored["count"])
            return [TrainingVolume(str(stored[f"name{n}"]), stored[f"input{n}"], stored[f"target{n}"],
                                   stored[f"valid{n}"] if f"valid{n}" in stored else None) for n in range(count)]
    volumes = make()
    cache.mkdir(parents=True, exist_ok=True)
    arrays = {"count": np.array(len(volumes))}
    for n, volume in enumerate(volumes):
        arrays.update({f"name{n}": np.array(volume.name), f"input{n}": volume.input, f"target{n}": volume.target})
        if volume.valid is not None:
            arrays[f"valid{n}"] = volume.valid
    temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # DDP ranks may write at once
    np.savez(temporary, **arrays)
    temporary.replace(path)
    return volumes


def simulated_volumes(seeds: list[int], frames: int, target: str, settings: ObnlmSettings,
                      cache: Path | None = None) -> list[TrainingVolume]:
    """Every frame of one simulated sequence per seed, with its target."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}")
    volumes = []
    for seed in seeds:
        key = {"kind": "sim", "seed": seed, "frames": frames, "target": target,
               "obnlm": dataclasses.asdict(settings) if target == "obnlm" else None}

        def make(seed=seed) -> list[TrainingVolume]:
            phantom = simulate_sequence(frames, seed)
            out = []
            for t in range(frames):
                bmode = phantom.bmode[t].astype(np.float32)
                goal = (despeckle_array(bmode, settings, "cpu") if target == "obnlm"
                        else phantom.echogenicity[t].astype(np.float32))
                out.append(TrainingVolume(f"phantom seed {seed} frame {t}", bmode, goal))
            return out

        volumes += _cached(cache, key, make)
    return volumes


def real_volume(name: str, settings: ObnlmSettings, cache: Path | None = None) -> TrainingVolume:
    """A bundled real B-mode volume with its OBNLM target; `valid` marks non-empty voxels."""
    key = {"kind": "real", "name": name, "obnlm": dataclasses.asdict(settings)}

    def make() -> list[TrainingVolume]:
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data(name)))).astype(np.float32)
        return [TrainingVolume(name, volume, despeckle_array(volume, settings, "cpu"), volume > 0)]

    return _cached(cache, key, make)[0]


def training_set(target: str, n_sequences: int, frames: int, settings: ObnlmSettings, include_real: bool,
                 cache: Path | None = None) -> list[TrainingVolume]:
    seeds = list(range(TRAINING_SEED_START, TRAINING_SEED_START + n_sequences))
    volumes = simulated_volumes(seeds, frames, target, settings, cache)
    if include_real and target == "obnlm":
        volumes.append(real_volume(REAL_TRAINING, settings, cache))
    return volumes


def validation_set(target: str, settings: ObnlmSettings, cache: Path | None = None) -> list[TrainingVolume]:
    """Held-out volumes: simulator seeds never trained on, and (OBNLM target) MouseLiverB."""
    volumes = simulated_volumes(list(VALIDATION_SEEDS), 1, target, settings, cache)
    if target == "obnlm":
        volumes.append(real_volume(REAL_VALIDATION, settings, cache))
    return volumes
