"""Orthogonal slice views of volumes as PNG images, at the volume's physical aspect ratio."""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

VIEW_NAMES = ("axial-k", "plane-j", "plane-i")


def display_window(volume: np.ndarray) -> tuple[float, float]:
    """Grey window (low, high) from the 1st and 99.5th percentiles of the non-zero voxels (real
    volumes often hold an empty outside region and a few bright reflectors)."""
    values = volume[volume != 0] if np.any(volume != 0) else volume.ravel()
    low, high = np.percentile(values, [1.0, 99.5])
    return float(low), float(max(high, low + 1e-6))


def centre_slices(volume: np.ndarray, spacing: tuple[float, float, float],
                  pixel_mm: float | None = None) -> list[np.ndarray]:
    """The three centre slices (k, j, i planes) of a (k, j, i) volume, resampled to square pixels of
    pixel_mm (default: about 400 pixels along the longest side).

    spacing is (i, j, k) in mm; returns float arrays (rows, columns).
    """
    si, sj, sk = spacing
    k, j, i = volume.shape
    pixel_mm = pixel_mm or max(i * si, j * sj, k * sk) / 400  # about 400 pixels across
    planes = [
        (volume[k // 2], (sj, si)),          # rows j, cols i: the B-mode plane
        (volume[:, j // 2, :], (sk, si)),    # rows k, cols i
        (volume[:, :, i // 2], (sk, sj)),    # rows k, cols j
    ]
    out = []
    for plane, (row_mm, col_mm) in planes:
        size = (max(1, round(plane.shape[0] * row_mm / pixel_mm)), max(1, round(plane.shape[1] * col_mm / pixel_mm)))
        tensor = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))[None, None]
        out.append(F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy())
    return out


def to_grey(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    return (np.clip((image - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)


def side_by_side(images: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Place uint8 images left to right on a white background, top-aligned."""
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = np.full((height, width), 255, np.uint8)
    x = 0
    for im in images:
        canvas[: im.shape[0], x: x + im.shape[1]] = im
        x += im.shape[1] + gap
    return canvas


def write_png(image: np.ndarray, path: str | os.PathLike) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(image), str(path))


def write_comparison(volumes: list[np.ndarray], spacing: tuple[float, float, float], prefix: str,
                     window: tuple[float, float] | None = None) -> list[str]:
    """One PNG per orthogonal view: the volumes' centre slices side by side. Returns the paths.

    Every image of a view shares one grey window: `window`, or by default `display_window` of the
    first volume's slice in that view (so a mostly dark real volume stays readable)."""
    views = [centre_slices(v, spacing) for v in volumes]
    paths = []
    for index, name in enumerate(VIEW_NAMES):
        path = f"{prefix}-{name}.png"
        shared = window or display_window(views[0][index])
        write_png(side_by_side([to_grey(v[index], shared) for v in views]), path)
        paths.append(path)
    return paths
