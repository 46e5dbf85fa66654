"""Analytic liver-like anatomy: reflectivity (dB) and tissue labels at any point.

Coordinates are physical (x, y, z) in mm = (lateral, depth, elevation) = the (i, j, k) volume axes,
with the transducer at depth 0. Every structure's size and place is drawn from one seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

#: Tissue labels of the label maps.
LABELS = {
    "background": 0,
    "abdominal_wall": 1,
    "parenchyma": 2,
    "vessel": 3,
    "lesion_hypoechoic": 4,
    "lesion_hyperechoic": 5,
    "cyst": 6,
    "diaphragm": 7,
}
#: Reflectivity of anechoic content (blood, cyst fluid), dB relative to parenchyma.
ANECHOIC_DB = -60.0


def _depth(rng: np.random.Generator, low: float, high: float) -> float:
    """A depth drawn uniformly in [low, high] (the same draw as rng.uniform(low, high)); the middle of
    the two when a shallow field of view leaves the range empty."""
    u = rng.random()
    return low + (high - low) * u if high > low else 0.5 * (low + high)


@dataclasses.dataclass
class LiverAnatomy:
    """One randomised liver phantom; `extent` is the field of view (x, y, z) in mm."""

    extent: tuple[float, float, float]
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        ex, ey, ez = self.extent
        self.wall_depth = rng.uniform(0.10, 0.16) * ey
        self.wall_tilt = rng.uniform(-0.04, 0.04)
        self.fat_depth = self.wall_depth * rng.uniform(0.3, 0.5)
        self.diaphragm_depth = rng.uniform(0.78, 0.9) * ey
        self.diaphragm_centre = (rng.uniform(0.2, 0.8) * ex, rng.uniform(0.3, 0.7) * ez)
        self.diaphragm_curvature = rng.uniform(0.004, 0.012)
        self.diaphragm_thickness = rng.uniform(0.9, 1.5)
        liver_top, liver_bottom = self.wall_depth + 2.0, self.diaphragm_depth - 4.0
        self.vessels = []
        for _ in range(rng.integers(2, 5)):
            point = np.array([rng.uniform(0.1, 0.9) * ex, _depth(rng, liver_top + 3, liver_bottom - 3),
                              rng.uniform(0.2, 0.8) * ez])
            direction = rng.normal(size=3) * np.array([1.0, 0.4, 0.6])
            self.vessels.append((point, direction / np.linalg.norm(direction), rng.uniform(1.2, 3.5)))
        self.lesions = []
        for _ in range(rng.integers(1, 4)):
            centre = np.array([rng.uniform(0.15, 0.85) * ex, _depth(rng, liver_top + 6, liver_bottom - 6),
                               rng.uniform(0.25, 0.75) * ez])
            radii = rng.uniform(3.0, 6.5, size=3) * np.array([1.0, 0.9, 0.8])
            contrast = rng.choice([-1.0, 1.0]) * rng.uniform(5.0, 9.0)
            self.lesions.append((centre, radii, contrast))
        self.cysts = []
        if rng.random() < 0.7:
            centre = np.array([rng.uniform(0.15, 0.85) * ex, _depth(rng, liver_top + 5, liver_bottom - 5),
                               rng.uniform(0.3, 0.7) * ez])
            self.cysts.append((centre, rng.uniform(2.5, 5.0)))

    def evaluate(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reflectivity (dB, float32) and label (uint8) at points (..., 3) in mm."""
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        db = torch.zeros(x.shape, dtype=torch.float32)
        label = torch.full(x.shape, LABELS["parenchyma"], dtype=torch.uint8)

        def paint(mask: torch.Tensor, value: float, name: str) -> None:
            db[mask] = value
            label[mask] = LABELS[name]

        for centre, radii, contrast in self.lesions:
            r2 = sum(((c - float(m)) / float(r)) ** 2 for c, m, r in zip((x, y, z), centre, radii))
            paint(r2 <= 1.0, contrast, "lesion_hyperechoic" if contrast > 0 else "lesion_hypoechoic")
        for point, direction, radius in self.vessels:
            rel = [c - float(p) for c, p in zip((x, y, z), point)]
            along = sum(r * float(d) for r, d in zip(rel, direction))
            dist2 = sum((r - along * float(d)) ** 2 for r, d in zip(rel, direction))
            wall = (dist2 <= (radius + 0.5) ** 2) & (dist2 > radius ** 2)
            db[wall] = 6.0  # bright vessel wall, still parenchyma tissue
            paint(dist2 <= radius ** 2, ANECHOIC_DB, "vessel")
        for centre, radius in self.cysts:
            r2 = sum((c - float(m)) ** 2 for c, m in zip((x, y, z), centre))
            paint(r2 <= radius ** 2, ANECHOIC_DB, "cyst")

        wall_depth = self.wall_depth + self.wall_tilt * (x - self.extent[0] / 2)
        paint(y < wall_depth, -2.0, "abdominal_wall")
        db[(y < self.fat_depth)] = -9.0  # subcutaneous fat: darker band inside the wall
        db[(y >= wall_depth - 0.6) & (y < wall_depth)] = 10.0  # fascia: bright line at the wall's base

        cx, cz = self.diaphragm_centre
        surface = self.diaphragm_depth - self.diaphragm_curvature * ((x - cx) ** 2 + (z - cz) ** 2)
        paint(y > surface + self.diaphragm_thickness, -30.0, "background")
        paint((y >= surface) & (y <= surface + self.diaphragm_thickness), 15.0, "diaphragm")
        return db, label
