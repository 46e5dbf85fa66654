"""VoxelMorph (Balakrishnan et al., IEEE TMI 2019) in torch: network, spatial transformer,
scaling-and-squaring integration and the training loss (the paper's eq. 5 plus smoothness).

Tensors are (batch, channel, k, j, i). Displacements inside the network are in voxels, channel
order (k, j, i); `displacement_to_field` turns them into the ITK field (LPS mm) used elsewhere.

The network predicts a stationary velocity at half the in-plane resolution (VoxelMorph's
`int_downsize` 2): breathing motion is smooth, and dropping the full-resolution decoder layers
makes a 128x128x32 pair about 4x cheaper. The velocity is integrated there and the displacement
upsampled to the input grid.
"""

from __future__ import annotations

import warnings
from typing import List

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from us3d.models.unet import Conv3d

#: The network pads k to a multiple of 8 and (j, i) to multiples of 16 (its strides).
PAD_MULTIPLE = (8, 16, 16)


def _identity_grid(shape: List[int], device: torch.device) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    return torch.stack(torch.meshgrid(axes, indexing="ij"))  # (3, k, j, i) voxel coordinates


def transform(moving: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """moving(x + u(x)), trilinear, edge values outside; u in voxels, (b, 3, k, j, i), channels (k, j, i)."""
    shape = list(displacement.shape[2:])
    position = _identity_grid(shape, displacement.device)[None] + displacement
    # grid_sample wants (x, y, z) = (i, j, k) normalised to [-1, 1] with align_corners=True
    normalised = torch.stack([2 * position[:, 2 - axis] / max(shape[2 - axis] - 1, 1) - 1 for axis in range(3)],
                             dim=-1)
    return F.grid_sample(moving, normalised, mode="bilinear", padding_mode="border", align_corners=True)


class SpatialTransformer(nn.Module):
    """`transform` as a module (VoxelMorph's name for it)."""

    def forward(self, moving: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        return transform(moving, displacement)


def integrate(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Diffeomorphic displacement from a stationary velocity field by scaling and squaring."""
    displacement = velocity / (2 ** steps)
    for _ in range(steps):
        displacement = displacement + transform(displacement, displacement)
    return displacement


def translation(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """(b, 3) shift s in voxels, (k, j, i), that best aligns moving(x + s) with fixed(x): the peak of their
    FFT cross-correlation within a quarter of each axis, refined to sub-voxel by a parabola per axis."""
    dims = [2, 3, 4]
    shape = [fixed.shape[2], fixed.shape[3], fixed.shape[4]]
    spectrum = torch.conj(torch.fft.rfftn(fixed, dim=dims)) * torch.fft.rfftn(moving, dim=dims)
    correlation = torch.fft.irfftn(spectrum, s=shape, dim=dims)[:, 0]  # (b, k, j, i): sum fixed(x) moving(x + s)
    allowed = torch.ones(shape, dtype=torch.bool, device=fixed.device)
    for axis in range(3):
        n = shape[axis]
        index = torch.arange(n, device=fixed.device)
        near = (index <= n // 4) | (index >= n - n // 4)
        view = [1, 1, 1]
        view[axis] = n
        allowed = allowed & near.view(view)
    correlation = torch.where(allowed[None], correlation, torch.full_like(correlation, -1e30))
    batch = torch.arange(correlation.shape[0], device=fixed.device)
    peak = correlation.flatten(1).argmax(1)
    indices = [peak // (shape[1] * shape[2]), (peak // shape[2]) % shape[1], peak % shape[2]]
    centre = correlation[batch, indices[0], indices[1], indices[2]]
    shifts: List[torch.Tensor] = []
    for axis in range(3):
        n = shape[axis]
        before = [indices[0], indices[1], indices[2]]
        after = [indices[0], indices[1], indices[2]]
        before[axis] = (indices[axis] - 1) % n
        after[axis] = (indices[axis] + 1) % n
        low = correlation[batch, before[0], before[1], before[2]]
        high = correlation[batch, after[0], after[1], after[2]]
        curvature = low - 2 * centre + high
        offset = torch.where(curvature < 0, 0.5 * (low - high) / torch.where(curvature < 0, curvature,
                                                                                   -torch.ones_like(curvature)),
                             torch.zeros_like(curvature))
        position = indices[axis].float() + offset.clamp(-0.5, 0.5)
        shifts.append(torch.where(position > n / 2, position - n, position))
    return torch.stack(shifts, 1)


class _Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: List[int]) -> None:
        super().__init__()
        self.conv = Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.activation = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x))


def normalised(volume: torch.Tensor) -> torch.Tensor:
    """Each volume of the batch minus its mean, divided by its std (1 for a constant volume)."""
    flat = volume.flatten(1)
    mean = flat.mean(1).view(-1, 1, 1, 1, 1)
    std = flat.std(1).view(-1, 1, 1, 1, 1)
    return (volume - mean) / torch.where(std > 0, std, torch.ones_like(std))


class VoxelMorph(nn.Module):
    """(fixed, moving) volumes (b, 1, k, j, i), any intensity scale -> displacement in voxels
    (b, 3, k, j, i), channels (k, j, i): warping moving by it (`SpatialTransformer`) aligns it to fixed.

    Encoder: strided 3x3x3 convolutions, widths 16-32-32-32 as in VoxelMorph; the first halves
    only (j, i), which makes the B-mode grid (0.3-0.4 mm in-plane, 0.8 mm elevation) about
    isotropic, the next three halve every axis. Decoder 32-32-32-16 with skips, one more
    16-channel convolution and a flow head with small initial weights, at half in-plane
    resolution. The velocity is integrated by scaling and squaring (`integration_steps`).
    Each volume is normalised by its own mean and std and the moving volume is first shifted by
    `translation` (as VoxelMorph expects pre-aligned inputs): the network predicts what remains,
    and the output is the sum. Sizes are padded (edge values) to multiples of `PAD_MULTIPLE`
    and the output cropped back.
    """

    def __init__(self, encoder: tuple[int, ...] = (16, 32, 32, 32), decoder: tuple[int, ...] = (32, 32, 32, 16, 16),
                 integration_steps: int = 7) -> None:
        super().__init__()
        if len(encoder) != 4 or len(decoder) != 5:
            raise ValueError("VoxelMorph needs 4 encoder widths and 5 decoder widths")
        self.encoder_widths = list(encoder)
        self.decoder_widths = list(decoder)
        self.integration_steps = integration_steps
        strides = [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
        self.encoders = nn.ModuleList()
        channels = 2
        for width, stride in zip(encoder, strides):
            self.encoders.append(_Block(channels, width, stride))
            channels = width
        self.bottom = _Block(channels, decoder[0], [1, 1, 1])
        channels = decoder[0]
        self.decoders = nn.ModuleList()
        for level in range(3):  # back up to the first encoder level (half in-plane resolution)
            self.decoders.append(_Block(channels + encoder[2 - level], decoder[level + 1], [1, 1, 1]))
            channels = decoder[level + 1]
        self.extra = _Block(channels, decoder[4], [1, 1, 1])
        self.flow = Conv3d(decoder[4], 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        if fixed.dim() != 5 or fixed.shape[1] != 1 or fixed.shape != moving.shape:
            raise ValueError("fixed and moving must both be (batch, 1, k, j, i) with the same shape")
        k, j, i = fixed.shape[2], fixed.shape[3], fixed.shape[4]
        pads = [(-k) % 8, (-j) % 16, (-i) % 16]  # PAD_MULTIPLE
        fixed_n, moving_n = normalised(fixed.float()), normalised(moving.float())
        # rigid pre-alignment (VoxelMorph expects pre-aligned inputs): the network learns what remains
        shift = translation(fixed_n, moving_n).view(-1, 3, 1, 1, 1).expand(-1, 3, k, j, i)
        y = torch.cat([fixed_n, transform(moving_n, shift)], 1)
        if pads[0] > 0 or pads[1] > 0 or pads[2] > 0:
            y = F.pad(y, [0, pads[2], 0, pads[1], 0, pads[0]], mode="replicate")
        skips: List[torch.Tensor] = []
        for encoder in self.encoders:
            y = encoder(y)
            skips.append(y)
        y = self.bottom(y)
        for level, decoder in enumerate(self.decoders):
            skip = skips[2 - level]
            y = F.interpolate(y, size=[skip.shape[2], skip.shape[3], skip.shape[4]], mode="trilinear",
                              align_corners=False)
            y = decoder(torch.cat([y, skip], 1))
        velocity = self.flow(self.extra(y)).contiguous()
        if self.integration_steps > 0:
            velocity = integrate(velocity, self.integration_steps)
        # half in-plane resolution -> the padded input grid; (j, i) components are in half-voxels
        full = [k + pads[0], j + pads[1], i + pads[2]]
        displacement = F.interpolate(velocity, size=full, mode="trilinear", align_corners=False)
        scale = torch.tensor([full[0] / velocity.shape[2], full[1] / velocity.shape[3], full[2] / velocity.shape[4]],
                             device=displacement.device).view(1, 3, 1, 1, 1)
        return (displacement * scale)[:, :, :k, :j, :i] + shift


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


def model_name(preprocessing: str) -> str:
    """The bundled VoxelMorph model for frames with this pre-processing (none, obnlm, unet): one model
    was trained on all three."""
    return "voxelmorph"


def register_voxelmorph(fixed: sitk.Image, moving: sitk.Image, module: torch.nn.Module,
                        device: torch.device) -> sitk.Image:
    """Displacement field (LPS mm, fixed grid) from a VoxelMorph module; `moving` must be on the fixed grid.

    A CUDA out-of-memory error falls back to the CPU with a warning.
    """
    fixed_tensor = torch.from_numpy(sitk.GetArrayFromImage(fixed).astype(np.float32))[None, None]
    moving_tensor = torch.from_numpy(sitk.GetArrayFromImage(moving).astype(np.float32))[None, None]
    with torch.inference_mode():
        try:
            displacement = module.to(device)(fixed_tensor.to(device), moving_tensor.to(device))
        except torch.cuda.OutOfMemoryError:
            if device.type != "cuda":
                raise
            warnings.warn("CUDA out of memory: registering on the CPU instead")
            displacement = module.to("cpu")(fixed_tensor, moving_tensor)
    return displacement_to_field(displacement[0].float().cpu().numpy(), fixed)
