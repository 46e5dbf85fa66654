"""B-mode image formation by a convolution model with point scatterers (complex baseband).

Each scatterer contributes a_i * sqrt(R_lin(X_i)) * exp(-2j k0 y_i) (y_i its current depth, so the
phase is exact), splatted to the nearest sample of a grid 2x finer in depth, convolved with a
separable Gaussian pulse-echo PSF, decimated to the voxel grid; the envelope |IQ| is log-compressed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

#: Mean of 20*log10 of a Rayleigh envelope relative to 10*log10 of its mean power (-gamma_E*10/ln 10).
LOG_RAYLEIGH_OFFSET_DB = -10.0 * 0.5772156649015329 / math.log(10.0)


@dataclasses.dataclass(frozen=True)
class ImagingSetup:
    """Probe and grid. shape is (k, j, i); spacing is (i, j, k) = (lateral, axial, elevation) mm."""

    shape: tuple[int, int, int] = (32, 128, 128)
    spacing: tuple[float, float, float] = (0.4, 0.3, 0.8)
    frequency_mhz: float = 3.5
    sound_speed: float = 1540.0  # m/s
    fractional_bandwidth: float = 0.5
    lateral_fwhm: float = 1.2  # mm
    elevation_fwhm: float = 2.5  # mm
    scatterer_density: float = 40.0  # per mm^3
    dynamic_range_db: float = 50.0
    parenchyma_db: float = 30.0  # where parenchyma's mean power sits above the display floor
    noise_db: float = -35.0  # electronic noise power relative to parenchyma
    attenuation_db_cm_mhz: float = 0.0  # one-way tissue attenuation (liver: about 0.5)
    tgc: float = 1.0  # fraction of the attenuation that time-gain compensation gives back
    sector_deg: float = 0.0  # 0: linear array; else a sector scan of this opening angle (zero outside)

    @property
    def extent(self) -> tuple[float, float, float]:
        """Field of view (x, y, z) in mm."""
        k, j, i = self.shape
        return (i * self.spacing[0], j * self.spacing[1], k * self.spacing[2])

    @property
    def wavenumber(self) -> float:
        """k0 = 2 pi f0 / c in rad/mm."""
        return 2 * math.pi * self.frequency_mhz * 1e6 / (self.sound_speed * 1e3)

    @property
    def psf_sigma(self) -> tuple[float, float, float]:
        """Pulse-echo envelope Gaussian sigma (x, y, z) in mm."""
        fwhm = 2 * math.sqrt(2 * math.log(2))
        sigma_f = self.fractional_bandwidth * self.frequency_mhz * 1e6 / fwhm  # Hz
        sigma_t = 1.0 / (2 * math.pi * sigma_f)
        axial = self.sound_speed * 1e3 * sigma_t / 2  # mm, two-way
        return (self.lateral_fwhm / fwhm, axial, self.elevation_fwhm / fwhm)

    def depth_gains(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attenuation, TGC) amplitude factors per depth sample j, shape (j, 1): the echo is attenuated
        on its two-way path; the receiver's gain then restores `tgc` of it, noise included."""
        depth_cm = torch.arange(self.shape[1], dtype=torch.float32).view(-1, 1) * (self.spacing[1] / 10)
        loss_db = 2 * self.attenuation_db_cm_mhz * self.frequency_mhz * depth_cm
        return 10 ** (-loss_db / 20), 10 ** (self.tgc * loss_db / 20)

    def sector_mask(self) -> torch.Tensor | None:
        """(j, i) bool: the sector's field of view (None for a linear array): a fan from a virtual apex
        above the top centre, 0.7 of the width wide at the top, cut by an arc at the bottom."""
        if self.sector_deg <= 0:
            return None
        ex, ey, _ = self.extent
        half = math.radians(self.sector_deg) / 2
        radius = 0.35 * ex / math.tan(half)  # apex height above the top
        y = torch.arange(self.shape[1], dtype=torch.float32).view(-1, 1) * self.spacing[1] + radius
        x = torch.arange(self.shape[2], dtype=torch.float32).view(1, -1) * self.spacing[0] - ex / 2
        r = torch.sqrt(x ** 2 + y ** 2)
        return (torch.atan2(x.abs(), y) <= half) & (r <= radius + ey)

    def voxel_centres(self) -> torch.Tensor:
        """(k, j, i, 3) grid of voxel positions (x, y, z) in mm."""
        k, j, i = self.shape
        sx, sy, sz = self.spacing
        zz, yy, xx = torch.meshgrid(torch.arange(k) * sz, torch.arange(j) * sy, torch.arange(i) * sx,
                                    indexing="ij")
        return torch.stack([xx, yy, zz], dim=-1).float()


_AXIAL_UPSAMPLING = 2


def _gaussian_taps(sigma_vox: float) -> torch.Tensor:
    half = max(1, int(math.ceil(3.5 * sigma_vox)))
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    return torch.exp(-0.5 * (t / sigma_vox) ** 2)


def _convolution_matrix(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """(size, size) matrix applying a centred 1D kernel with zeros outside the volume."""
    half = len(kernel) // 2
    offsets = torch.arange(size)[None, :] - torch.arange(size)[:, None] + half
    valid = (offsets >= 0) & (offsets < len(kernel))
    return torch.where(valid, kernel[offsets.clamp(0, len(kernel) - 1)], torch.zeros(()))


def _separable_blur(volume: torch.Tensor, taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Convolve real (..., k, j, i) volumes with 1D kernels along k, j, i (zero outside)."""
    k, j, i = volume.shape[-3:]
    v = volume @ _convolution_matrix(taps[2], i).T
    v = (_convolution_matrix(taps[1], j) @ v)
    v = torch.einsum("ab,...bji->...aji", _convolution_matrix(taps[0], k), v)
    return v


def psf_taps(setup: ImagingSetup, power: bool = False) -> tuple[torch.Tensor, ...]:
    """PSF kernels along (k, j, i) on the voxel grid (or of |PSF|^2 when power=True)."""
    sx, sy, sz = setup.psf_sigma
    scale = 1 / math.sqrt(2) if power else 1.0
    return tuple(_gaussian_taps(s * scale / d) for s, d in
                 ((sz, setup.spacing[2]), (sy, setup.spacing[1]), (sx, setup.spacing[0])))


def form_envelope(setup: ImagingSetup, positions: torch.Tensor, amplitudes: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """Envelope |IQ| (k, j, i) of scatterers at positions (N, 3) mm with real amplitudes (N,).

    The envelope is scaled so that homogeneous 0 dB tissue has unit mean power.
    """
    k, j, i = setup.shape
    sx, sy, sz = setup.spacing
    fine = (k, j * _AXIAL_UPSAMPLING, i)
    fine_dy = sy / _AXIAL_UPSAMPLING
    index = torch.round(positions / torch.tensor([sx, fine_dy, sz]))
    keep = ((index >= 0) & (index < torch.tensor([fine[2], fine[1], fine[0]], dtype=index.dtype))).all(dim=1)
    index = index[keep]
    flat = ((index[:, 2] * fine[1] + index[:, 1]) * fine[2] + index[:, 0]).to(torch.int64).numpy()
    phase = (-2.0 * setup.wavenumber) * positions[keep, 1]
    amp = amplitudes[keep]
    size = fine[0] * fine[1] * fine[2]
    real = np.bincount(flat, (amp * torch.cos(phase)).numpy(), minlength=size)
    imag = np.bincount(flat, (amp * torch.sin(phase)).numpy(), minlength=size)

    taps = psf_taps(setup)
    sigma_y = setup.psf_sigma[1] / fine_dy
    fine_taps = (taps[0], _gaussian_taps(sigma_y), taps[2])
    splat = torch.from_numpy(np.stack([real, imag])).float().view((2,) + fine)
    iq = _separable_blur(splat, fine_taps)[:, :, ::_AXIAL_UPSAMPLING]
    # Mean power of homogeneous unit-reflectivity tissue: density * voxel volume * sum of PSF^2.
    kernel_energy = 1.0
    for t in fine_taps:
        kernel_energy *= float((t ** 2).sum())
    unit_power = setup.scatterer_density * sx * fine_dy * sz * kernel_energy
    noise_sigma = math.sqrt(10 ** (setup.noise_db / 10) / 2)
    noise = torch.randn((2,) + setup.shape, generator=generator) * noise_sigma
    iq = iq / math.sqrt(unit_power)
    if setup.attenuation_db_cm_mhz > 0:
        attenuation, gain = setup.depth_gains()
        return torch.sqrt((iq[0] * attenuation + noise[0]) ** 2 + (iq[1] * attenuation + noise[1]) ** 2) * gain
    return torch.sqrt((iq[0] + noise[0]) ** 2 + (iq[1] + noise[1]) ** 2)


def log_compress(setup: ImagingSetup, envelope: torch.Tensor) -> torch.Tensor:
    """Envelope (unit parenchyma power) -> B-mode grey levels in [0, 255] (float, unrounded)."""
    db = 20 * torch.log10(envelope.clamp(min=1e-12)) + setup.parenchyma_db
    return (db / setup.dynamic_range_db * 255.0).clamp(0.0, 255.0)


def expected_bmode(setup: ImagingSetup, reflectivity_db: torch.Tensor) -> torch.Tensor:
    """Speckle-free B-mode: mean log-compressed value of the tissue's PSF-blurred mean power.

    This is the ground truth an ideal despeckler would return (grey levels, float).
    """
    power = _separable_blur(10 ** (reflectivity_db / 10), psf_taps(setup, power=True))
    norm = _separable_blur(torch.ones_like(reflectivity_db), psf_taps(setup, power=True))
    noise_power = 10 ** (setup.noise_db / 10)
    if setup.attenuation_db_cm_mhz > 0:
        attenuation, gain = setup.depth_gains()
        power = (power / norm * attenuation ** 2 + noise_power) * gain ** 2
    else:
        power = power / norm + noise_power
    db = 10 * torch.log10(power) + LOG_RAYLEIGH_OFFSET_DB + setup.parenchyma_db
    return (db / setup.dynamic_range_db * 255.0).clamp(0.0, 255.0)
