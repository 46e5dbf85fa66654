"""Physics-based 3D/4D B-mode liver phantom with known ground truth.

`simulate_sequence(n_frames, seed)` returns B-mode frames, the clean echogenicity, tissue labels,
the speckle envelope and the exact frame-to-reference displacement (mm) of every frame.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from us3d.phantom.anatomy import LABELS, LiverAnatomy
from us3d.phantom.motion import BreathingMotion, BreathingSettings
from us3d.phantom.speckle import ImagingSetup, expected_bmode, form_envelope, log_compress

if TYPE_CHECKING:
    from us3d.io import VolumeSequence

__all__ = ["LABELS", "SIMULATOR_VERSION", "BreathingSettings", "ImagingSetup", "PhantomSequence", "breathing_motion",
           "simulate_sequence", "simulate_volume"]

#: Raised whenever a seed's frames or true motion change, so that caches of simulated data are remade.
#: 2: the abdominal wall slides at its base in the tissue, not at a fixed depth of the image.
SIMULATOR_VERSION = 2


@dataclasses.dataclass
class PhantomSequence:
    """Simulated frames, all (t, k, j, i) on one grid; displacement is (t, k, j, i, 3) in mm, (x, y, z)."""

    bmode: np.ndarray  # uint8 B-mode
    echogenicity: np.ndarray  # float32 speckle-free B-mode (ground truth for despeckling)
    labels: np.ndarray  # uint8, see LABELS
    envelope: np.ndarray  # float32 envelope, unit mean power in parenchyma
    displacement: np.ndarray  # float32 backward field: frame t voxel x came from x + d in frame 0
    setup: ImagingSetup
    frame_interval: float = 1.0 / 6.0  # s (the paper's sequences were 6 Hz)
    depth_axis: str = "j"  # the in-plane array axis along depth ("i" after `varied.transposed`)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.setup.spacing

    def to_sequence(self) -> VolumeSequence:
        """The B-mode frames as a `us3d.io.VolumeSequence` (spacing, frame times in s)."""
        from us3d.io import VolumeSequence

        return VolumeSequence(self.bmode, self.spacing,
                              index_values=frame_time_values(len(self.bmode), self.frame_interval))


def simulate_sequence(n_frames: int = 8, seed: int = 0, setup: ImagingSetup | None = None,
                      breathing: BreathingSettings | None = None,
                      progress: Callable[[int, int], None] | None = None) -> PhantomSequence:
    """Simulate a 4D respiratory liver sequence; frame 0 is the exhale (reference) frame.

    `setup` (probe, grid, speckle, gain) and `breathing` default to the project's standard
    configuration; `us3d.phantom.varied` draws both from wide ranges.
    """
    if n_frames < 1:
        raise ValueError("n_frames must be >= 1")
    setup = setup or ImagingSetup()
    anatomy = LiverAnatomy(setup.extent, seed)
    motion = breathing_motion(seed, setup, breathing, anatomy)
    generator = torch.Generator().manual_seed(seed)

    # Scatterers fixed to the tissue, over the field of view plus what can move into it.
    grid = setup.voxel_centres()
    margin = torch.tensor([3.5 * s for s in setup.psf_sigma])
    if n_frames > 1:
        margin = margin + motion.max_displacement(grid) + 0.5
    low, high = -margin, torch.tensor(setup.extent) + margin
    low[1] = max(float(low[1]), -3.5 * setup.psf_sigma[1])  # nothing moves in from above the skin
    count = int(setup.scatterer_density * float(torch.prod(high - low)))
    reference = low + (high - low) * torch.rand((count, 3), generator=generator)
    signs = torch.randint(0, 2, (count,), generator=generator).float() * 2 - 1
    reflectivity, _ = anatomy.evaluate(reference)
    amplitudes = signs * torch.sqrt(10 ** (reflectivity / 10))

    sector = setup.sector_mask()
    shape = (n_frames,) + setup.shape
    out = PhantomSequence(np.empty(shape, np.uint8), np.empty(shape, np.float32), np.empty(shape, np.uint8),
                          np.empty(shape, np.float32), np.empty(shape + (3,), np.float32), setup)
    for t in range(n_frames):
        positions = motion.forward(reference, t)
        envelope = form_envelope(setup, positions, amplitudes, generator)
        displacement = motion.backward(grid, t)
        tissue_db, labels = anatomy.evaluate(grid + displacement)
        out.envelope[t] = envelope.numpy()
        out.bmode[t] = torch.round(log_compress(setup, envelope)).to(torch.uint8).numpy()
        out.echogenicity[t] = expected_bmode(setup, tissue_db).numpy()
        out.labels[t] = labels.numpy()
        out.displacement[t] = displacement.numpy()
        if sector is not None:  # nothing is imaged outside the sector
            for array in (out.bmode, out.echogenicity, out.labels, out.envelope):
                array[t][:, ~sector.numpy()] = 0
        if progress is not None:
            progress(t + 1, n_frames)
    return out


def breathing_motion(seed: int, setup: ImagingSetup | None = None, breathing: BreathingSettings | None = None,
                     anatomy: LiverAnatomy | None = None) -> BreathingMotion:
    """The breathing motion that `simulate_sequence(n, seed, setup, breathing)` moves the tissue by: its
    `backward(points, t)` is frame t's true displacement (mm) at points (..., 3) (x, y, z) mm, such as
    `setup.voxel_centres()`. `anatomy`: the seed's `LiverAnatomy` when already made."""
    setup = setup or ImagingSetup()
    anatomy = anatomy or LiverAnatomy(setup.extent, seed)
    return BreathingMotion(setup.extent, anatomy.wall_depth, seed, breathing or BreathingSettings(), anatomy.wall_tilt)


def simulate_volume(seed: int = 0, setup: ImagingSetup | None = None) -> PhantomSequence:
    """Simulate one static 3D liver volume (a one-frame sequence)."""
    return simulate_sequence(1, seed, setup)


def frame_time_values(n_frames: int, interval: float) -> list[str]:
    """Sequence index values (s) as Slicer stores them."""
    digits = max(0, -int(math.floor(math.log10(interval))) + 2) if interval > 0 else 3
    return [f"{t * interval:.{digits}f}" for t in range(n_frames)]
