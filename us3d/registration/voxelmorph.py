"""VoxelMorph (Balakrishnan et al., IEEE TMI 2019) in torch: network, spatial transformer,
scaling-and-squaring integration and the unsupervised loss (the paper's eq. 5 plus smoothness).

Tensors are (batch, channel, k, j, i). Displacements inside the network are in voxels, channel
order (k, j, i); `displacement_to_field` turns them into the ITK field (LPS mm) used elsewhere.
Training and a bundled model are still to come (issue 4).
"""

from __future__ import annotations

from typing import List

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

#: Spatial sizes must be multiples of this (four 2x poolings).
SIZE_MULTIPLE = 16


def _identity_grid(shape: List[int], device: torch.device) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    return torch.stack(torch.meshgrid(axes, indexing="ij"))  # (3, k, j, i) voxel coordinates


class SpatialTransformer(nn.Module):
    """moving(x + u(x)), trilinear; u in voxels, (b, 3, k, j, i) with channels (k, j, i)."""

    def forward(self, moving: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        shape = list(displacement.shape[2:])
        position = _identity_grid(shape, displacement.device)[None] + displacement
        # grid_sample wants (x, y, z) = (i, j, k) normalised to [-1, 1] with align_corners=True
        normalised = torch.stack([2 * position[:, 2 - axis] / max(shape[2 - axis] - 1, 1) - 1 for axis in range(3)],
                                 dim=-1)
        return F.grid_sample(moving, normalised, mode="bilinear", padding_mode="border", align_corners=True)


def integrate(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Diffeomorphic displacement from a stationary velocity field by scaling and squaring."""
    transformer = SpatialTransformer()
    displacement = velocity / (2 ** steps)
    for _ in range(steps):
        displacement = displacement + transformer(displacement, displacement)
    return displacement


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.LeakyReLU(0.2))


class VoxelMorph(nn.Module):
    """U-Net over (fixed, moving) -> displacement in voxels (b, 3, k, j, i).

    Widths as in VoxelMorph: encoder 16-32-32-32, decoder 32-32-32-32-32-16-16; the flow head
    starts with small weights so the initial field is near zero. With `integration_steps` > 0
    the head's output is a velocity integrated by scaling and squaring.
    """

    def __init__(self, encoder=(16, 32, 32, 32), decoder=(32, 32, 32, 32, 32, 16, 16), integration_steps: int = 7):
        super().__init__()
        self.integration_steps = integration_steps
        self.encoders = nn.ModuleList()
        channels, skips = 2, []
        for width in encoder:
            self.encoders.append(_block(channels, width))
            skips.append(width)
            channels = width
        self.decoders = nn.ModuleList()
        for level in range(len(encoder)):
            self.decoders.append(_block(channels + skips[-1 - level], decoder[level]))
            channels = decoder[level]
        self.extra = nn.ModuleList()
        for width in decoder[len(encoder):]:
            self.extra.append(_block(channels, width))
            channels = width
        self.flow = nn.Conv3d(channels, 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        y = torch.cat([fixed, moving], 1)
        skips: List[torch.Tensor] = []
        for encoder in self.encoders:
            y = encoder(y)
            skips.append(y)
            y = F.max_pool3d(y, 2)
        for level, decoder in enumerate(self.decoders):
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            y = decoder(torch.cat([y, skips[len(skips) - 1 - level]], 1))
        for block in self.extra:
            y = block(y)
        flow = self.flow(y)
        if self.integration_steps > 0:
            flow = integrate(flow, self.integration_steps)
        return flow


def smoothness(displacement: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of the displacement along k, j and i."""
    dk = displacement[:, :, 1:] - displacement[:, :, :-1]
    dj = displacement[:, :, :, 1:] - displacement[:, :, :, :-1]
    di = displacement[..., 1:] - displacement[..., :-1]
    return (dk.pow(2).mean() + dj.pow(2).mean() + di.pow(2).mean()) / 3


def registration_loss(fixed: torch.Tensor, warped: torch.Tensor, displacement: torch.Tensor,
                      smoothness_weight: float = 0.01) -> torch.Tensor:
    """MSE between fixed and warped moving (the paper's eq. 5) + weighted smoothness."""
    return F.mse_loss(warped, fixed) + smoothness_weight * smoothness(displacement)


def displacement_to_field(displacement: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """ITK displacement field (LPS mm) on `reference`'s grid from a (3, k, j, i) voxel displacement."""
    index_mm = np.moveaxis(displacement[::-1], 0, -1) * np.asarray(reference.GetSpacing())  # (k, j, i, [i, j, k])
    direction = np.reshape(reference.GetDirection(), (3, 3))
    field = sitk.GetImageFromArray((index_mm @ direction.T).astype(np.float64), isVector=True)
    field.CopyInformation(reference)
    return field
