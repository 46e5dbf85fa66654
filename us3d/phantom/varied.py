"""Imaging and breathing drawn from wide ranges, for training and held-out sets that do not
teach one simulator configuration.

`varied_setup` draws an `ImagingSetup` (voxel spacing, centre frequency, bandwidth,
lateral and elevation PSF widths, scatterer density down to speckle that is not fully developed,
dynamic range, gain, noise floor, depth attenuation with partial TGC, linear or sector geometry),
`varied_breathing` the `BreathingSettings` (SI amplitude 5-20 mm, its direction, depth dependence, breathing period,
a wall that slides or follows). `transposed(phantom)` swaps the two in-plane axes, so that depth
runs along i instead of j, as a volume may arrive from another scanner. `simulate_conditions`
simulates a sequence under one of the named CONDITIONS, with what `draw_conditions` draws.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from us3d.phantom import PhantomSequence
from us3d.phantom.motion import BreathingSettings
from us3d.phantom.speckle import ImagingSetup


def varied_setup(rng: np.random.Generator, shape: tuple[int, int, int] = (32, 128, 128)) -> ImagingSetup:
    """An imaging setup drawn from ranges that span common abdominal probes."""
    dynamic_range = rng.uniform(40.0, 70.0)
    return ImagingSetup(
        shape=shape,
        spacing=(rng.uniform(0.3, 0.5), rng.uniform(0.2, 0.4), rng.uniform(0.6, 1.1)),
        frequency_mhz=rng.uniform(2.0, 6.0),
        fractional_bandwidth=rng.uniform(0.3, 0.8),
        lateral_fwhm=rng.uniform(0.8, 2.4),
        elevation_fwhm=rng.uniform(1.5, 4.0),
        scatterer_density=float(np.exp(rng.uniform(np.log(2.0), np.log(60.0)))),
        dynamic_range_db=dynamic_range,
        parenchyma_db=rng.uniform(0.45, 0.8) * dynamic_range,  # overall gain
        noise_db=rng.uniform(-50.0, -25.0),
        attenuation_db_cm_mhz=rng.uniform(0.0, 0.7) if rng.random() < 0.7 else 0.0,
        tgc=rng.uniform(0.6, 1.1),
        sector_deg=rng.uniform(50.0, 80.0) if rng.random() < 0.3 else 0.0,
    )


def varied_breathing(rng: np.random.Generator) -> BreathingSettings:
    """Breathing drawn from wide ranges: SI peak 5-20 mm, within 40 degrees of the lateral axis,
    depth dependence from decreasing to strongly increasing, a sliding wall 70% of the time."""
    sliding = bool(rng.random() < 0.7)
    return BreathingSettings(
        amplitude=rng.uniform(5.0, 20.0),
        direction_deg=rng.uniform(-40.0, 40.0),
        sliding=sliding,
        wall_follow=rng.uniform(0.0, 0.3) if sliding else 0.0,
        depth_gain=rng.uniform(-0.2, 0.6),
        period=rng.uniform(6.0, 12.0),
    )


def transposed(phantom: PhantomSequence) -> PhantomSequence:
    """The same phantom with i and j swapped (depth along i): arrays, displacement components and
    spacing."""
    def swap(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.swapaxes(array, 2, 3))

    spacing = phantom.setup.spacing
    shape = phantom.setup.shape
    # the setup keeps its physics; only the grid description follows the arrays
    setup = dataclasses.replace(phantom.setup, shape=(shape[0], shape[2], shape[1]),
                                spacing=(spacing[1], spacing[0], spacing[2]))
    displacement = swap(phantom.displacement)[..., [1, 0, 2]]
    return dataclasses.replace(phantom, bmode=swap(phantom.bmode), echogenicity=swap(phantom.echogenicity),
                               labels=swap(phantom.labels), envelope=swap(phantom.envelope),
                               displacement=np.ascontiguousarray(displacement), setup=setup,
                               depth_axis="i" if phantom.depth_axis == "j" else "j")


#: Simulation conditions: the project's standard configuration; everything drawn from wide ranges
#: (depth along i half of the time); 16 mm breathing with a wall that does not follow the liver.
CONDITIONS = ("standard", "varied", "sliding")


def draw_conditions(conditions: str, seed: int) -> tuple[ImagingSetup | None, BreathingSettings, bool]:
    """What `simulate_conditions` draws for `conditions` and `seed`: the imaging setup (None: the
    standard one), the breathing settings and whether depth runs along i (the phantom transposed)."""
    if conditions == "standard":
        return None, BreathingSettings(), False
    rng = np.random.default_rng([seed, 8191])
    if conditions == "varied":
        setup, breathing = varied_setup(rng), varied_breathing(rng)
        return setup, breathing, bool(rng.random() < 0.5)
    if conditions == "sliding":
        setup = varied_setup(rng)
        breathing = BreathingSettings(amplitude=16.0, direction_deg=0.0, sliding=True, wall_follow=0.0,
                                      depth_gain=rng.uniform(0.0, 0.4), period=rng.uniform(7.0, 9.0))
        return setup, breathing, False
    raise ValueError(f"conditions must be one of {', '.join(CONDITIONS)}, not {conditions!r}")


def simulate_conditions(conditions: str, n_frames: int, seed: int,
                        progress: Callable[[int, int], None] | None = None) -> PhantomSequence:
    """A breathing sequence under `conditions` (see CONDITIONS), drawn from `seed`."""
    from us3d.phantom import simulate_sequence

    setup, breathing, swap = draw_conditions(conditions, seed)
    phantom = simulate_sequence(n_frames, seed, setup, breathing, progress)
    return transposed(phantom) if swap else phantom
