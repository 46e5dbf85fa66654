"""Separable linear maps of volumes (blurs, interpolation between grids) as one matrix product per
axis. On the CPU these are much faster than torch's depthwise or single-channel conv3d and its
trilinear interpolation, forward and backward, and they run unchanged on CUDA and in TorchScript.

Tensors are (batch, channel, k, j, i); each map is an (out, in) matrix along one axis.
"""

from __future__ import annotations

from typing import List

import torch


def apply(volume: torch.Tensor, matrices: List[torch.Tensor]) -> torch.Tensor:
    """(b, c, k, j, i) with `matrices[a]` (out, in) applied along axis a of (k, j, i)."""
    b, c = volume.shape[0], volume.shape[1]
    out = volume @ matrices[2].t()  # (b, c, k, j, i')
    out = torch.matmul(matrices[1], out)  # (b, c, k, j', i')
    k, j, i = out.shape[2], out.shape[3], out.shape[4]
    out = torch.matmul(matrices[0], out.reshape(b * c, k, j * i))  # (b c, k', j' i')
    return out.reshape(b, c, matrices[0].shape[0], j, i)


def gaussian(volume: torch.Tensor, sigma: float, replicate: bool) -> torch.Tensor:
    """(b, c, k, j, i) blurred by a Gaussian of `sigma` samples along k, j and i (`gaussian_matrix`'s
    kernel; outside each axis the edge values, `replicate`, or zeros). On the CPU in float32 a compiled
    kernel applies the taps directly (`_separable_cpu`), elsewhere (and in TorchScript) the matrix products."""
    if not torch.jit.is_scripting():
        if volume.device.type == "cpu" and volume.dtype == torch.float32 and not volume.requires_grad:
            return _gaussian_compiled(volume, sigma, replicate)
    return apply(volume, [gaussian_matrix(volume.shape[2], sigma, volume, replicate),
                          gaussian_matrix(volume.shape[3], sigma, volume, replicate),
                          gaussian_matrix(volume.shape[4], sigma, volume, replicate)])


@torch.jit.unused
def _gaussian_compiled(volume: torch.Tensor, sigma: float, replicate: bool) -> torch.Tensor:
    from us3d.registration._separable_cpu import blur

    radius = gaussian_radius(sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    taps = (taps / taps.sum()).float()
    b, c, k, j, i = volume.shape
    flat = volume.reshape(b * c, k, j, i).contiguous()
    out = torch.empty_like(flat)
    blur(flat.numpy(), taps.numpy(), replicate, out.numpy())
    return out.view(b, c, k, j, i)


def gaussian_matrix(n: int, sigma: float, like: torch.Tensor, replicate: bool) -> torch.Tensor:
    """(n, n) matrix of a Gaussian blur of `sigma` samples along an axis of n, taps within
    `gaussian_radius(sigma)`, normalised to sum 1; outside the axis the edge values (`replicate`) or
    zeros. In `like`'s dtype and device."""
    radius = gaussian_radius(sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=like.device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    columns = torch.arange(n, device=like.device).view(-1, 1) + offsets.long().view(1, -1)
    weights = taps.view(1, -1).expand(n, offsets.numel())
    if not replicate:
        weights = weights * ((columns >= 0) & (columns < n)).to(torch.float64)
    matrix = torch.zeros(n, n, dtype=torch.float64, device=like.device)
    matrix.scatter_add_(1, columns.clamp(0, n - 1), weights)
    return matrix.to(like.dtype)


def gaussian_radius(sigma: float) -> int:
    """Taps each side of `gaussian_matrix`'s kernel: 3 sigma, at least 1."""
    return max(1, int(3 * sigma + 0.5))


def linear_weights(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, weight), each (n_out,): sample n of a grid of n_out samples lies between samples low[n]
    and low[n] + 1 of a grid of n_in samples spanning the same interval (first and last samples on
    each other, `align_corners`), with `weight[n]` on the second; float64 weights."""
    if n_in == 1 or n_out == 1:
        return torch.zeros(n_out, dtype=torch.long), torch.zeros(n_out, dtype=torch.float64)
    position = torch.arange(n_out, dtype=torch.float64) * (n_in - 1) / (n_out - 1)
    low = position.floor().clamp(max=n_in - 2).long()
    return low, position - low


def linear_matrix(n_out: int, n_in: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) matrix of linear interpolation between a grid of n_in samples and one of n_out
    samples spanning the same interval (`linear_weights`)."""
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    low, weight = linear_weights(n_out, n_in)
    rows = torch.arange(n_out)
    if n_in == 1:
        matrix[:, 0] = 1.0
    else:
        matrix.index_put_((rows, low), 1 - weight, accumulate=True)
        matrix.index_put_((rows, low + 1), weight, accumulate=True)
    return matrix.to(dtype=like.dtype, device=like.device)
