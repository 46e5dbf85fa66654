"""Image-quality metrics for speckle reduction, computed in float64.

All functions take numpy arrays of equal shape; optional boolean masks select a region.
Degenerate input (empty region, zero variance where a variance divides) raises InputError.
"""

from __future__ import annotations

import numpy as np
from skimage import metrics as _skm

from us3d.errors import InputError


def _values(volume: np.ndarray, mask: np.ndarray | None = None, name: str = "volume") -> np.ndarray:
    values = np.asarray(volume, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != values.shape:
            raise InputError(f"mask shape {mask.shape} does not match {name} shape {values.shape}")
        values = values[mask]
    if values.size == 0:
        raise InputError(f"the {name} (or its region) is empty")
    if not np.isfinite(values).all():
        raise InputError(f"the {name} contains NaN or infinite values")
    return values.ravel()


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise InputError(f"volumes differ in shape: {np.shape(a)} vs {np.shape(b)}")


def _positive_variance(values: np.ndarray, name: str) -> float:
    variance = values.var()
    if variance == 0:
        raise InputError(f"the {name} is constant; the metric needs some variation")
    return float(variance)


def smpi(original: np.ndarray, filtered: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Speckle suppression and mean preservation index on the paper's scale (lower is better).

    SMPI = Q * sqrt(var(filtered) / var(original)) with both volumes first normalised by the
    original's mean and std (the paper normalises every volume before anything else), so
    Q = 1 + |mean(filtered) - mean(original)| / std(original): the mean shift in units of the
    original's std. The value does not depend on the volumes' grey-level scale.
    `smpi_grey_levels` gives the index with Q in grey levels.
    """
    _same_shape(original, filtered)
    o, r = _values(original, mask, "original"), _values(filtered, mask, "filtered volume")
    variance = _positive_variance(o, "original")
    q = 1.0 + abs(r.mean() - o.mean()) / np.sqrt(variance)
    return float(q * np.sqrt(r.var() / variance))


def smpi_grey_levels(original: np.ndarray, filtered: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SMPI with Q = 1 + |mean(filtered) - mean(original)| in the volumes' own grey levels (so it
    depends on their scale; `smpi` is the scale-free value the paper reports)."""
    _same_shape(original, filtered)
    o, r = _values(original, mask, "original"), _values(filtered, mask, "filtered volume")
    q = 1.0 + abs(r.mean() - o.mean())
    return float(q * np.sqrt(r.var() / _positive_variance(o, "original")))


def enl(volume: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Equivalent number of looks, mean^2 / variance (higher is smoother)."""
    v = _values(volume, mask)
    return float(v.mean() ** 2 / _positive_variance(v, "volume"))


def speckle_suppression_index(original: np.ndarray, filtered: np.ndarray,
                              mask: np.ndarray | None = None) -> float:
    """SSI = (std_r / mean_r) * (mean_o / std_o); below 1 means speckle was reduced."""
    _same_shape(original, filtered)
    o, r = _values(original, mask, "original"), _values(filtered, mask, "filtered volume")
    if o.mean() == 0 or r.mean() == 0:
        raise InputError("speckle suppression index needs volumes with non-zero mean")
    return float((r.std() / r.mean()) * (o.mean() / np.sqrt(_positive_variance(o, "original"))))


def cnr(volume: np.ndarray, region_a: np.ndarray, region_b: np.ndarray) -> float:
    """Contrast-to-noise ratio |mean_a - mean_b| / sqrt(var_a + var_b)."""
    a, b = _values(volume, region_a, "region a"), _values(volume, region_b, "region b")
    spread = a.var() + b.var()
    if spread == 0:
        raise InputError("both regions are constant; CNR is undefined")
    return float(abs(a.mean() - b.mean()) / np.sqrt(spread))


def gcnr(volume: np.ndarray, region_a: np.ndarray, region_b: np.ndarray, bins: int = 256) -> float:
    """Generalised CNR (Rodriguez-Molares et al. 2020): 1 - overlap of the two regions' histograms.

    Both histograms share `bins` equal bins over the joint value range; 0 = same distribution,
    1 = fully separable.
    """
    a, b = _values(volume, region_a, "region a"), _values(volume, region_b, "region b")
    low, high = min(a.min(), b.min()), max(a.max(), b.max())
    if low == high:
        return 0.0
    edges = np.linspace(low, high, bins + 1)
    pa = np.histogram(a, edges)[0] / a.size
    pb = np.histogram(b, edges)[0] / b.size
    return float(1.0 - np.minimum(pa, pb).sum())


def mse(volume: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared error against a reference."""
    _same_shape(volume, reference)
    return float(np.mean((_values(volume) - _values(reference, name="reference")) ** 2))


def _data_range(reference: np.ndarray, data_range: float | None) -> float:
    if data_range is None:
        r = _values(reference, name="reference")
        data_range = float(r.max() - r.min())
    if not data_range > 0:
        raise InputError("the reference is constant; give data_range explicitly")
    return data_range


def psnr(volume: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; data_range defaults to the reference's max - min."""
    _same_shape(volume, reference)
    data_range = _data_range(reference, data_range)
    return float(_skm.peak_signal_noise_ratio(np.asarray(reference, np.float64),
                                              np.asarray(volume, np.float64), data_range=data_range))


def ssim(volume: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float:
    """Mean structural similarity (3D window, 7 voxels or the smallest odd size that fits)."""
    _same_shape(volume, reference)
    data_range = _data_range(reference, data_range)
    win = min(7, *[s if s % 2 else s - 1 for s in np.shape(reference)])
    if win < 3:
        raise InputError("SSIM needs at least 3 voxels along every axis")
    return float(_skm.structural_similarity(np.asarray(reference, np.float64), np.asarray(volume, np.float64),
                                            data_range=data_range, win_size=win))
