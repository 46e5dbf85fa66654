"""How much OBNLM's output depends on voxel parity (its blocks are centred every 2 voxels).

Prints the PSNR between OBNLM(shifted input) shifted back and OBNLM(input), for one-voxel shifts,
and the PSNR of the average over the four in-plane parity phases against OBNLM: the best a
translation-equivariant model could do. Context for the U-Net's fidelity to OBNLM.

Run: .venv/bin/python benchmarks/obnlm_parity.py
"""

from __future__ import annotations

import numpy as np

from us3d import metrics
from us3d.despeckling import ObnlmSettings, despeckle_array
from us3d.phantom import simulate_volume

INNER = (slice(None), slice(6, -6), slice(6, -6))  # away from the wrapped edges of np.roll


def obnlm_shifted(volume: np.ndarray, shift: tuple[int, int, int], settings: ObnlmSettings) -> np.ndarray:
    """OBNLM of the input shifted by `shift` (k, j, i) voxels, shifted back."""
    moved = np.roll(volume, shift, axis=(0, 1, 2))
    return np.roll(despeckle_array(moved, settings, "cpu"), [-s for s in shift], axis=(0, 1, 2))


def main() -> None:
    settings = ObnlmSettings()
    volume = simulate_volume(seed=9000).bmode[0].astype(np.float32)
    reference = despeckle_array(volume, settings, "cpu").astype(np.float64)
    phases = [obnlm_shifted(volume, shift, settings) for shift in ((0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1))]
    for shift, phase in zip(((0, 1, 0), (0, 0, 1), (0, 1, 1)), phases[1:]):
        psnr = metrics.psnr(phase[INNER].astype(np.float64), reference[INNER], data_range=255)
        print(f"shift {shift}: PSNR of shifted OBNLM vs OBNLM {psnr:.2f} dB")
    average = np.mean(phases, axis=0)
    psnr = metrics.psnr(average[INNER], reference[INNER], data_range=255)
    print(f"average over the four parity phases vs OBNLM: {psnr:.2f} dB")


if __name__ == "__main__":
    main()
