"""Writing a simulated phantom and its ground truth to files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from us3d.io import VolumeSequence, atomic_outputs, is_sequence_path, to_image, write_any
from us3d.phantom import PhantomSequence
from us3d.registration.fields import field_image, write_field


def _as_sequence(phantom: PhantomSequence, frames: np.ndarray) -> VolumeSequence:
    return phantom.to_sequence().with_frames(frames)


def _as_image(phantom: PhantomSequence, volume: np.ndarray) -> sitk.Image:
    """`volume` on the phantom's grid (the geometry of its B-mode sequence)."""
    return to_image(volume, phantom.to_sequence())


def displacement_image(phantom: PhantomSequence, frame: int) -> sitk.Image:
    """Frame `frame`'s ground-truth displacement as an ITK displacement field (LPS, mm, float64).

    On the frame's grid: the tissue at voxel x was at x + d(x) in frame 0 (the exhale reference),
    so resampling frame 0 with this field gives frame `frame`'s anatomy.
    """
    return field_image(phantom.displacement[frame], _as_image(phantom, phantom.bmode[frame]))


def write_phantom(phantom: PhantomSequence, output: str | os.PathLike,
                  truth_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write the B-mode (volume or .seq.nrrd) and, with truth_dir, its ground truth; all or nothing."""
    output = Path(output)
    sequence = is_sequence_path(output)
    items: list[tuple[Path, object, Callable]] = []  # (path, data, how it is written)

    def add(path: Path, frames: np.ndarray) -> None:
        items.append((path, _as_sequence(phantom, frames) if sequence else _as_image(phantom, frames[0]), write_any))

    add(output, phantom.bmode)
    if truth_dir is not None:
        truth = Path(truth_dir)
        suffix = ".seq.nrrd" if sequence else ".nrrd"
        add(truth / f"echogenicity{suffix}", phantom.echogenicity)
        add(truth / f"labels{suffix}", phantom.labels)
        add(truth / f"envelope{suffix}", phantom.envelope)
        for frame in range(len(phantom.bmode)):
            items.append((truth / f"displacement_{frame:03d}.mha", displacement_image(phantom, frame), write_field))
    with atomic_outputs([path for path, _, _ in items]) as temporaries:
        for temporary, (_, data, write) in zip(temporaries, items):
            write(data, temporary)
    return [path for path, _, _ in items]
