"""OBNLM: the Optimized Bayesian Non-Local Means speckle filter (Coupe et al., IEEE TIP 2009).

Two modes on (k, j, i) volumes, k being the elevation axis:

- ``"slicewise"``: every k-slice filtered on its own exactly as the public 2D implementation does
  (the method's reference code, used by the speckle-reduction paper this project follows);
  float64, matches its kernel to about 1e-12.
- ``"3d"``: the paper's 3D formulation: blocks of (2a+1)^3 voxels centred every 2 voxels on all
  axes, a (2M+1)^3 search volume and 3x3x3 local-mean preselection, with the same distance,
  weighting and aggregation as the 2D kernel (so ``h`` means the same in both modes).

The method is patented (INRIA, WO/2009/133307); see the README.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from us3d.devices import resolve_device
from us3d.errors import InputError
from us3d.filters._obnlm_cpu import obnlm_padded
from us3d.filters._obnlm_torch import obnlm_padded_torch
from us3d.options import OBNLM_MODES

#: Preselection bounds on the ratio of local means (the public kernel's 0.8 < ratio < 1.25).
RATIO_LOW, RATIO_HIGH = 0.8, 1.25
#: Offset added after min-max scaling to [0, 255], so the Pearson denominator never nears 0.
INTENSITY_OFFSET = 100.0


def obnlm(
    volume: np.ndarray,
    mode: Literal["slicewise", "3d"] = "slicewise",
    search_radius: int = 3,
    block_radius: int = 1,
    h: float = 0.7,
    device: str = "auto",
    intensity_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Despeckle a 3D volume with OBNLM.

    Parameters
    ----------
    volume : (k, j, i) array of a scalar B-mode volume (any real dtype, finite values).
    mode : "slicewise" (each k-slice in 2D, the public implementation) or "3d".
    search_radius : M, half-size of the search window in voxels (window 2M+1 per axis).
    block_radius : alpha, half-size of the compared blocks in voxels (>= 1).
    h : smoothing parameter; weights are exp(-d / h^2) with d the Pearson-like block distance
        normalised by the block size.
    device : "auto", "cpu" (compiled kernel) or "cuda" (torch).
    intensity_range : (low, high) grey levels mapped to OBNLM's [0, 255] (plus its offset of 100)
        instead of the volume's own minimum and maximum, e.g. to filter a crop exactly as it is
        filtered inside the whole volume. Must contain every value of the volume.

    Returns
    -------
    float64 array of the same shape, in the input's intensity range.
    """
    volume = _check_volume(volume)
    if mode not in OBNLM_MODES:
        raise InputError(f"mode must be one of {', '.join(OBNLM_MODES)}, not {mode!r}")
    if int(block_radius) != block_radius or block_radius < 1:
        raise InputError(f"block radius (alpha) must be an integer >= 1, not {block_radius}")
    if int(search_radius) != search_radius or search_radius < 1:
        raise InputError(f"search radius (M) must be an integer >= 1, not {search_radius}")
    if not (np.isfinite(h) and h > 0):
        raise InputError(f"smoothing h must be a positive number, not {h}")
    search_radius, block_radius = int(search_radius), int(block_radius)
    torch_device = resolve_device(device)

    low, high = float(volume.min()), float(volume.max())
    if intensity_range is not None:
        if not (intensity_range[0] <= low and high <= intensity_range[1]):
            raise InputError(f"intensity range {tuple(intensity_range)} does not contain the volume's "
                             f"values ({low:g} to {high:g})")
        low, high = float(intensity_range[0]), float(intensity_range[1])
    scale = high - low
    if scale == 0:
        return volume.astype(np.float64)  # a constant volume is its own filtered output
    x = (volume.astype(np.float64) - low) / scale * 255.0 + INTENSITY_OFFSET

    a, m = block_radius, search_radius
    if mode == "slicewise":
        pad = ((0, 0), (a, a), (a, a))
        params = ((0, m, m), (0, a, a), (1, 2, 2), (0, 1, 1))
    else:
        pad = ((a, a), (a, a), (a, a))
        params = ((m, m, m), (a, a, a), (2, 2, 2), (1, 1, 1))
    padded = np.pad(x, pad, mode="symmetric")

    if torch_device.type == "cpu":
        filtered = obnlm_padded(padded, *params, float(h), RATIO_LOW, RATIO_HIGH)
    else:
        dtype = torch.float64 if mode == "slicewise" else torch.float32
        tensor = torch.from_numpy(padded).to(torch_device, dtype)
        filtered = obnlm_padded_torch(tensor, *params, float(h), RATIO_LOW, RATIO_HIGH)
        filtered = filtered.double().cpu().numpy()

    crop = tuple(slice(before, before + n) for (before, _), n in zip(pad, volume.shape))
    return (filtered[crop] - INTENSITY_OFFSET) / 255.0 * scale + low


def _check_volume(volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(f"expected a 3D (k, j, i) volume, got an array of {volume.ndim} dimensions")
    if volume.size == 0:
        raise InputError("the volume is empty")
    if not (np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)):
        raise InputError(f"expected a real-valued volume, got dtype {volume.dtype}")
    if np.issubdtype(volume.dtype, np.floating) and not np.isfinite(volume).all():
        raise InputError("the volume contains NaN or infinite values")
    return volume
