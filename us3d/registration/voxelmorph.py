"""The registration network (VoxelMorph's setting, Balakrishnan et al., IEEE TMI 2019, with a
correlation decoder), the spatial transformer and the FFT translation that pre-aligns the volumes
(loss and training: `us3d.training.registration`).

Tensors are (batch, channel, k, j, i). Displacements are in voxels, channel order (k, j, i);
`us3d.registration.fields.displacement_to_field` turns them into the ITK field (LPS mm) used elsewhere.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from us3d.models.unet import Conv3d, channels_last
from us3d.registration import separable

#: The network pads k to a multiple of 4 and (j, i) to multiples of 8 (its strides).
PAD_MULTIPLE = (4, 8, 8)


def _identity_grid(shape: List[int], device: torch.device) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    return torch.stack(torch.meshgrid(axes, indexing="ij"))  # (3, k, j, i) voxel coordinates


def transform(moving: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """moving(x + u(x)), trilinear, edge values outside; u in voxels, (b, 3, k, j, i), channels (k, j, i)
    (VoxelMorph's spatial transformer). On the CPU in float32, where no gradient is wanted, a compiled
    kernel (`_transform_cpu`), elsewhere (and in TorchScript) `grid_sample`."""
    if not torch.jit.is_scripting():
        if (moving.device.type == "cpu" and moving.dtype == displacement.dtype == torch.float32
                and not (torch.is_grad_enabled() and (moving.requires_grad or displacement.requires_grad))):
            return _transform_compiled(moving, displacement)
    shape = list(displacement.shape[2:])
    position = _identity_grid(shape, displacement.device)[None] + displacement
    # grid_sample wants (x, y, z) = (i, j, k) normalised to [-1, 1] with align_corners=True
    normalised = torch.stack([2 * position[:, 2 - axis] / max(shape[2 - axis] - 1, 1) - 1 for axis in range(3)],
                             dim=-1)
    return F.grid_sample(moving, normalised, mode="bilinear", padding_mode="border", align_corners=True)


@torch.jit.unused
def _transform_compiled(moving: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """`transform` by the compiled CPU kernel; channels-last features are read in place and the result
    has `moving`'s memory layout."""
    from us3d.registration._transform_cpu import transform as kernel

    if moving.shape[0] != displacement.shape[0] or moving.shape[2:] != displacement.shape[2:]:
        raise ValueError("moving and displacement must be (b, c, k, j, i) and (b, 3, k, j, i) on one grid")
    last = moving.permute(0, 2, 3, 4, 1)  # (b, k, j, i, c): a view of channels-last features
    out = torch.empty_like(last, memory_format=torch.contiguous_format)
    for item in range(moving.shape[0]):
        kernel(last[item].contiguous().numpy(), displacement[item].contiguous().numpy(), out[item].numpy())
    out = out.permute(0, 4, 1, 2, 3)
    return out if not moving.is_contiguous() else out.contiguous()


def _peak(score: torch.Tensor, allowed: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """(b, 3) position (k, j, i) of each batch item's maximum of `ranking` (b, k, j, i) where `allowed`,
    refined to sub-voxel by a parabola of `score` per axis; positions past half an axis wrap to negative."""
    shape = [score.shape[1], score.shape[2], score.shape[3]]
    score = torch.where(allowed, score, torch.full_like(score, -1e30))
    batch = torch.arange(score.shape[0], device=score.device)
    peak = torch.where(allowed, ranking, torch.full_like(ranking, -1e30)).flatten(1).argmax(1)
    indices = [peak // (shape[1] * shape[2]), (peak // shape[2]) % shape[1], peak % shape[2]]
    centre = score[batch, indices[0], indices[1], indices[2]]
    shifts: List[torch.Tensor] = []
    for axis in range(3):
        n = shape[axis]
        before = [indices[0], indices[1], indices[2]]
        after = [indices[0], indices[1], indices[2]]
        before[axis] = (indices[axis] - 1) % n
        after[axis] = (indices[axis] + 1) % n
        low = score[batch, before[0], before[1], before[2]]
        high = score[batch, after[0], after[1], after[2]]
        curvature = low - 2 * centre + high
        usable = (curvature < 0) & (low > -1e29) & (high > -1e29)
        offset = torch.where(usable, 0.5 * (low - high) / torch.where(usable, curvature, -torch.ones_like(curvature)),
                             torch.zeros_like(curvature))
        position = indices[axis].float() + offset.clamp(-0.5, 0.5)
        shifts.append(torch.where(position > n / 2, position - n, position))
    return torch.stack(shifts, 1)


def _correlate(a: torch.Tensor, b: torch.Tensor, size: List[int]) -> torch.Tensor:
    """sum over x of a(x) b(x + s) for every shift s (circular on a grid of `size`), (b, k, j, i)."""
    dims = [2, 3, 4]
    spectrum = torch.conj(torch.fft.rfftn(a, s=size, dim=dims)) * torch.fft.rfftn(b, s=size, dim=dims)
    return torch.fft.irfftn(spectrum, s=size, dim=dims)[:, 0]


def _detail(volume: torch.Tensor, reduce: List[int],
            data: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the volume reduced by `reduce`, its smooth trend removed, zero where it has no data; that mask):
    only blocks wholly inside the data count, `data` (b, 1, k, j, i) being 1 where a voxel has data, by
    default where it is above the volume's minimum. A block that straddles the edge of a sector scan
    would otherwise hold a dimmed edge that stays where it is while the tissue moves, and pull the shift
    towards zero."""
    if data is None:
        low = volume.flatten(1).min(1)[0].view(-1, 1, 1, 1, 1)
        data = (volume > low).float()
    mask = (F.avg_pool3d(data.float(), reduce, ceil_mode=True) > 0.999).float()
    pooled = F.avg_pool3d(volume.float(), reduce, ceil_mode=True)
    trend = _blur(pooled * mask, 3.0) / _blur(mask, 3.0).clamp(min=1e-6)
    return (pooled - trend) * mask, mask


def _padded(volume: torch.Tensor) -> torch.Tensor:
    """(b, c, k, j, i) padded with edge values to multiples of `PAD_MULTIPLE` (the network's strides)."""
    k, j, i = volume.shape[2], volume.shape[3], volume.shape[4]
    pads = [(-k) % 4, (-j) % 8, (-i) % 8]  # PAD_MULTIPLE (TorchScript reads no global tuple)
    if pads[0] > 0 or pads[1] > 0 or pads[2] > 0:
        volume = F.pad(volume, [0, pads[2], 0, pads[1], 0, pads[0]], mode="replicate")
    return volume


def _padded_size(shape: List[int]) -> List[int]:
    """The correlation grid: zero padding by at least half of each axis, so shifts up to that do not
    wrap, to the next size with no prime factor above 5 (FFTs of such sizes are the fast ones: a band
    slab's transforms took about 15% less time at 36 samples than at 33 = 3 x 11)."""
    sizes: List[int] = []
    for n in shape:
        size = n + n // 2
        while not _smooth(size):
            size += 1
        sizes.append(size)
    return sizes


def _smooth(n: int) -> bool:
    """Whether n has no prime factor above 5."""
    for p in [2, 3, 5]:
        while n % p == 0:
            n = n // p
    return n == 1


def translation_spectra(volume: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """(b, 3, ...) transforms of one volume's terms of `coarse_translation` (its data mask, its detail
    and the detail squared, at 1/`factor` in-plane resolution): a moving volume registered to
    many frames needs them once."""
    detail, mask = _detail(volume, [1, factor, factor])
    return detail_spectra(detail, mask)


def detail_spectra(detail: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`translation_spectra` from a volume's detail and mask as `_detail` makes them."""
    size = _padded_size([detail.shape[2], detail.shape[3], detail.shape[4]])
    return torch.fft.rfftn(torch.cat([mask, detail, detail * detail], 1), s=size, dim=[2, 3, 4])


def coarse_translation(fixed: torch.Tensor, moving: torch.Tensor, factor: int = 2,
                       min_overlap: float = 0.3, moving_spectra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(b, 3) shift in voxels (k, j, i) of the input grid from a masked, overlap-normalised cross-correlation
    (Padfield, IEEE TIP 2012) at 1/`factor` in-plane resolution, with shifts up to half of each axis.

    Regions at the volume's minimum (outside a sector scan, zero padding) carry no data; smooth
    trends (attenuation, TGC, shading), which do not move with the tissue, are removed by subtracting a
    Gaussian-blurred copy; shifts whose overlap is under `min_overlap` of the data (the smaller of the
    two volumes' data, as scikit-image's masked `phase_cross_correlation` measures it: a sector in a
    large box or a reconstructed sweep may fill under a third of its grid) are not considered, and the
    shift taken is the one whose correlation weighed by its overlap is the largest (Fisher's z times the
    voxel count's fourth root), so that a small overlap that correlates well by chance does not win.
    `moving_spectra`: `translation_spectra(moving, factor)`, computed once for a moving volume
    registered to many frames (then `moving` is not read).
    """
    reduce = [1, factor, factor]
    f, mf = _detail(fixed, reduce)
    right = translation_spectra(moving, factor) if moving_spectra is None else moving_spectra
    return detail_translation(f, mf, right, reduce, min_overlap)


def detail_translation(detail: torch.Tensor, mask: torch.Tensor, moving_spectra: torch.Tensor, reduce: List[int],
                       min_overlap: float = 0.3, overlap_power: float = 0.25) -> torch.Tensor:
    """(b, 3) shift in voxels of the input grid (`coarse_translation`'s core), from the fixed side's
    detail and data mask ((b, 1, k, j, i), reduced by `reduce`, as `_detail` makes them) and the moving
    side's `translation_spectra` on the same reduced grid; a shift must overlap `min_overlap` of the data,
    and the peak is the largest Fisher's z times the overlap's voxel count to the `overlap_power`."""
    shape = [detail.shape[2], detail.shape[3], detail.shape[4]]
    size = _padded_size(shape)
    dims = [2, 3, 4]
    # the transforms of the three fixed-side and three moving-side terms, then six pairwise products:
    # (mask, mask), (f, mask), (mask, m), (f, m), (f^2, mask), (mask, m^2)
    left = torch.conj(torch.fft.rfftn(torch.cat([mask, detail, detail * detail], 1), s=size, dim=dims))
    right = moving_spectra
    products = [left[:, a] * right[:, b] for a, b in ((0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (0, 2))]
    sums = torch.fft.irfftn(torch.stack(products, 1), s=size, dim=dims)
    count, sum_f, sum_m = sums[:, 0], sums[:, 1], sums[:, 2]
    sum_fm, sum_ff, sum_mm = sums[:, 3], sums[:, 4], sums[:, 5]
    overlap = count.clamp(min=1.0)
    numerator = sum_fm - sum_f * sum_m / overlap
    var_f = sum_ff - sum_f * sum_f / overlap
    var_m = sum_mm - sum_m * sum_m / overlap
    score = numerator / torch.sqrt((var_f * var_m).clamp(min=1e-12))
    # the peak: the correlation weighed by its overlap, Fisher's z times a power of the voxel count (by default
    # the fourth root), refined on the correlation itself. With no weight, small overlaps that correlate well by
    # chance won on a real sweep (data in 29% of its grid); with the square root (z's significance for
    # independent voxels), the whole overlap near zero shift won over a true shift of 40% of the field of view
    # on blurred volumes, whose textures correlate at any shift. Speckle's voxels are not independent.
    significance = torch.atanh(score.clamp(-0.999, 0.999)) * overlap.pow(overlap_power)
    data = torch.minimum(mask.flatten(1).sum(1), torch.real(moving_spectra[:, 0, 0, 0, 0]))
    allowed = count > min_overlap * data.view(-1, 1, 1, 1)
    for axis in range(3):
        index = torch.arange(size[axis], device=detail.device)
        near = (index <= shape[axis] // 2) | (index >= size[axis] - shape[axis] // 2)
        view = [1, 1, 1, 1]
        view[axis + 1] = size[axis]
        allowed = allowed & near.view(view)
    shift = _peak(score, allowed, significance)
    return shift * torch.tensor(reduce, dtype=shift.dtype, device=shift.device).view(1, 3)


def _blur(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (b, c, k, j, i) along every axis, zeros outside (`separable.gaussian`: a
    single-channel conv3d takes torch's slow reference path on the CPU)."""
    return separable.gaussian(volume, sigma, False)


def translation(fixed: torch.Tensor, moving: torch.Tensor, moving_spectra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(b, 3) shift s in voxels, (k, j, i), that best aligns moving(x + s) with fixed(x), within half of
    each axis: `coarse_translation` at half in-plane resolution (sub-voxel by a parabola per axis);
    `moving_spectra`: `translation_spectra(moving)`, when the moving volume is registered to many frames."""
    return coarse_translation(fixed, moving, 2, moving_spectra=moving_spectra)


class _Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: List[int], kernel: int = 3) -> None:
        super().__init__()
        self.conv = Conv3d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
        self.activation = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x))


def normalised(volume: torch.Tensor) -> torch.Tensor:
    """Each volume of the batch minus its mean, divided by its std (1 for a constant volume)."""
    flat = volume.flatten(1)
    mean = flat.mean(1).view(-1, 1, 1, 1, 1)
    std = flat.std(1).view(-1, 1, 1, 1, 1)
    # divided in place: one new volume, not two (each costs a pass through memory)
    return (volume - mean).div_(torch.where(std > 0, std, torch.ones_like(std)))


def _unit(features: torch.Tensor) -> torch.Tensor:
    """Features divided by their length over the channels at each voxel."""
    return features / (features.pow(2).sum(1, keepdim=True) + 1e-6).sqrt()


def correlation(fixed: torch.Tensor, moving: torch.Tensor, radius: List[int]) -> torch.Tensor:
    """Cost volume: for every offset o within `radius` (k, j, i) voxels, the cosine similarity of the
    feature vectors fixed(x) and moving(x + o), in [-1, 1]; (b, n_offsets, k, j, i), offsets in
    k-major order, zeros outside. (A plain channel mean of products was about 1e-4 of the
    estimator's other inputs at initialisation, and training hardly used it.)"""
    fixed, moving = _unit(fixed), _unit(moving)
    if not torch.jit.is_scripting():
        if (fixed.device.type == "cpu" and fixed.dtype == moving.dtype == torch.float32
                and not (torch.is_grad_enabled() and (fixed.requires_grad or moving.requires_grad))):
            return _correlation_compiled(fixed, moving, radius)
    rk, rj, ri = radius[0], radius[1], radius[2]
    k, j, i = fixed.shape[2], fixed.shape[3], fixed.shape[4]
    padded = F.pad(moving, [ri, ri, rj, rj, rk, rk])
    out: List[torch.Tensor] = []
    for dk in range(2 * rk + 1):
        for dj in range(2 * rj + 1):
            for di in range(2 * ri + 1):
                out.append((fixed * padded[:, :, dk:dk + k, dj:dj + j, di:di + i]).sum(1))
    return torch.stack(out, 1)


@torch.jit.unused
def _correlation_compiled(fixed: torch.Tensor, moving: torch.Tensor, radius: List[int]) -> torch.Tensor:
    """`correlation` of unit feature vectors by the compiled CPU kernel (`_correlation_cpu`); the
    scores come back channels-last, as the convolutions that read them want."""
    from us3d.registration._correlation_cpu import correlate

    b, k, j, i = fixed.shape[0], fixed.shape[2], fixed.shape[3], fixed.shape[4]
    out = torch.empty((b, k, j, i, _offsets(radius)), dtype=torch.float32)
    reach = np.asarray(radius, dtype=np.int64)
    for item in range(b):
        correlate(fixed[item].permute(1, 2, 3, 0).contiguous().numpy(),
                  moving[item].permute(1, 2, 3, 0).contiguous().numpy(), reach, out[item].numpy())
    return out.permute(0, 4, 1, 2, 3)


def _offsets(radius: List[int]) -> int:
    return (2 * radius[0] + 1) * (2 * radius[1] + 1) * (2 * radius[2] + 1)


def _resize(volume: torch.Tensor, size: List[int]) -> torch.Tensor:
    """Trilinear resampling of (b, c, k, j, i) to `size` (k, j, i), half-pixel centres (what
    `F.interpolate(..., mode="trilinear", align_corners=False)` does). The ATen operator is called
    directly: TorchScript would otherwise inline this torch's `F.interpolate`, whose code names
    operators that older torch releases lack."""
    return torch._C._nn.upsample_trilinear3d(volume, size, False)


def _rescaled(displacement: torch.Tensor, size: List[int]) -> torch.Tensor:
    """A voxel displacement resampled onto a grid of `size` covering the same volume (voxels
    `old / size` times larger, as strided convolutions make them), components rescaled to it."""
    old = [displacement.shape[2], displacement.shape[3], displacement.shape[4]]
    resized = _resize(displacement, size)
    scale = torch.tensor([size[0] / old[0], size[1] / old[1], size[2] / old[2]], dtype=displacement.dtype,
                         device=displacement.device)
    return resized * scale.view(1, 3, 1, 1, 1)


class _Encoder(nn.Module):
    """Features of one volume at three levels: (k, j/2, i/2), (k/2, j/4, i/4), (k/4, j/8, i/8); the
    first stride is in-plane only, which makes the B-mode grid (0.3-0.4 mm in-plane, 0.8 mm
    elevation) about isotropic."""

    def __init__(self, widths: List[int]) -> None:
        super().__init__()
        strides = [[1, 2, 2], [2, 2, 2], [2, 2, 2]]
        self.levels = nn.ModuleList()
        channels = 1
        for width, stride in zip(widths, strides):
            self.levels.append(nn.Sequential(_Block(channels, width, stride), _Block(width, width, [1, 1, 1])))
            channels = width

    def forward(self, volume: torch.Tensor) -> List[torch.Tensor]:
        features: List[torch.Tensor] = []
        y = volume
        for level in self.levels:
            y = level(y)
            features.append(y)
        return features


class _Estimator(nn.Module):
    """Cost volumes, fixed features and the current estimate -> increments of the 3 share logits and
    of the 3 residual displacement components (voxels)."""

    def __init__(self, in_channels: int, widths: List[int]) -> None:
        super().__init__()
        layers: List[nn.Module] = [_Block(in_channels, widths[0], [1, 1, 1], kernel=1)]
        for a, b in zip(widths[:-1], widths[1:]):
            layers.append(_Block(a, b, [1, 1, 1]))
        self.layers = nn.Sequential(*layers)
        self.flow = Conv3d(widths[-1], 6, 3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-3)
        nn.init.zeros_(self.flow.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow(self.layers(x))


class VoxelMorph(nn.Module):
    """(fixed, moving) volumes (b, 1, k, j, i), any intensity scale -> displacement in voxels
    (b, 3, k, j, i), channels (k, j, i): warping moving by it (`transform`, VoxelMorph's spatial
    transformer) aligns it to fixed.

    The bundled registration network: VoxelMorph's setting (a CNN maps the pair to a dense
    displacement, applied by a spatial transformer, trainable with MSE + smoothness alone), with
    a decoder that matches features instead of reading them side by side. A plain VoxelMorph
    U-Net on the concatenated volumes learnt only the motion's usual direction from our
    simulations, not to measure it (flipping the training pairs left it at its rigid step), and a
    sliding abdominal wall needs two motions at once; so, coarse to fine (after PWC-Net):

    1. each volume normalised by its own mean and std; `translation` (the FFT cross-correlation
       peak) is the first estimate everywhere (VoxelMorph expects pre-aligned inputs);
    2. one shared encoder gives features of both volumes at three levels (`_Encoder`);
    3. the estimate is  shift * share + residual: per voxel and axis, the share of the bulk
       translation that the tissue makes (a sliding abdominal wall makes none of it along the
       interface, the liver all of it), plus a residual displacement;
    4. at each level, coarsest first, two cost volumes: the fixed features against the moving
       features warped by the current estimate (offsets within `radii[n]` voxels; about +-10 mm at
       the coarsest level), and against the moving features not moved at all (`still_radii[n]`),
       where tissue that does not follow the bulk motion matches (not at the finest level, for speed);
       an estimator turns them, the
       fixed features and the estimate into increments of the share (as logits; it starts at 1)
       and of the residual;
    5. the half in-plane resolution estimate is upsampled to the input grid.

    Sizes are padded (edge values) to multiples of `PAD_MULTIPLE` and the output cropped back.
    """

    def __init__(self, encoder: tuple[int, ...] = (8, 16, 32), radii: tuple[tuple[int, int, int], ...] = (
            (3, 4, 4), (2, 2, 2), (1, 1, 1)), still_radii: tuple[tuple[int, int, int], ...] = (
            (1, 2, 2), (1, 1, 1), (0, 0, 0)), estimators: tuple[tuple[int, ...], ...] = (
            (64, 48, 32), (48, 32, 16), (12,))) -> None:
        super().__init__()
        if len(encoder) != 3 or len(radii) != 3 or len(still_radii) != 3 or len(estimators) != 3:
            raise ValueError("VoxelMorph needs 3 encoder widths, correlation radii and estimators")
        self.encoder_widths = list(encoder)
        self.radii = [list(r) for r in radii]
        self.still_radii = [list(r) for r in still_radii]
        self.estimator_widths = [list(e) for e in estimators]
        self.encoder = _Encoder(list(encoder))
        self.estimators = nn.ModuleList()
        for level in range(3):
            offsets = _offsets(radii[level]) + (_offsets(still_radii[level]) if max(still_radii[level]) > 0 else 0)
            self.estimators.append(_Estimator(offsets + encoder[2 - level] + 6, list(estimators[level])))

    def prepare_moving(self, moving: torch.Tensor) -> List[torch.Tensor]:
        """What `levels` computes from the moving volume (b, 1, k, j, i) alone: its translation
        spectra and its features at the three levels. A moving volume registered to every frame
        of a sequence is prepared once and passed as `levels(..., prepared=...)`: the same
        displacement, with the moving half of the translation and of the encoder done once."""
        moving_n = normalised(moving.float())
        return [translation_spectra(moving_n)] + self.encoder(_padded(moving_n))

    def levels(self, fixed: torch.Tensor, moving: torch.Tensor, every_level: bool = True,
               prepared: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Each level's displacement (coarsest first) on the input grid, voxels; the last is `forward`'s
        (only that one with `every_level` False). `prepared`: `prepare_moving(moving)`, for a moving
        volume registered to many frames."""
        if fixed.dim() != 5 or fixed.shape[1] != 1 or fixed.shape != moving.shape:
            raise ValueError("fixed and moving must both be (batch, 1, k, j, i) with the same shape")
        k, j, i = fixed.shape[2], fixed.shape[3], fixed.shape[4]
        fixed_n = normalised(fixed.float())
        fixed_p = _padded(fixed_n)
        full = [fixed_p.shape[2], fixed_p.shape[3], fixed_p.shape[4]]
        batch = fixed.shape[0]
        if prepared is None:
            moving_n = normalised(moving.float())
            shift = translation(fixed_n, moving_n)
            features = self.encoder(torch.cat([fixed_p, _padded(moving_n)], 0))  # both through one encoder
        else:
            shift = translation(fixed_n, moving, prepared[0])  # moving's spectra: moving itself is not read
            features = [torch.cat([a, b], 0) for a, b in zip(self.encoder(fixed_p), prepared[1:])]
        out: List[torch.Tensor] = []
        logits = torch.zeros(0)
        residual = torch.zeros(0)
        for level, estimator in enumerate(self.estimators):
            both = features[2 - level]
            f, m = both[:batch], both[batch:]
            size = [f.shape[2], f.shape[3], f.shape[4]]
            scale = torch.tensor([size[0] / full[0], size[1] / full[1], size[2] / full[2]], device=fixed.device)
            bulk = (shift * scale).view(-1, 3, 1, 1, 1)
            if level == 0:
                logits = torch.full([batch, 3, size[0], size[1], size[2]], 4.0, device=fixed.device)
                residual = torch.zeros([batch, 3, size[0], size[1], size[2]], device=fixed.device)
            else:
                logits = _resize(logits, size)
                residual = _rescaled(residual, size)
            flow = bulk * torch.sigmoid(logits) + residual
            inputs = [correlation(f, transform(m, flow), self.radii[level])]
            if max(self.still_radii[level]) > 0:
                inputs.append(correlation(f, m, self.still_radii[level]))
            # one memory layout for every part (the features' and the scores' channels-last), so the
            # concatenation is the only copy before the estimator's convolutions
            state = torch.cat([flow / 4.0, logits / 4.0], 1).contiguous(memory_format=torch.channels_last_3d)
            increment = estimator(torch.cat(inputs + [_unit(f), state], 1))
            logits = logits + increment[:, :3]
            residual = residual + increment[:, 3:]
            if every_level or level == 2:
                flow = bulk * torch.sigmoid(logits) + residual
                out.append(_rescaled(flow, full)[:, :, :k, :j, :i])
        return out

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor,
                prepared: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        return self.levels(fixed, moving, False, prepared)[-1]


def for_inference(module: nn.Module) -> nn.Module:
    """The network to run for inference on the CPU: a scripted `VoxelMorph` (a bundled model file)
    rebuilt as this module's class with its weights, so that its cost volumes run in the compiled
    kernel (`_correlation_cpu`: the network takes about 40% less time); any other module as it is.

    The rebuilt network must give the scripted one's displacement on a small random pair (to 1e-3
    voxel), or the scripted one is kept: a file saved by another us3d version may carry another forward.
    """
    names = ("encoder_widths", "radii", "still_radii", "estimator_widths")
    if getattr(module, "original_name", None) != "VoxelMorph" or not all(hasattr(module, n) for n in names):
        return module
    try:
        with torch.random.fork_rng(devices=[]):  # the initial weights, overwritten, leave the caller's RNG alone
            rebuilt = VoxelMorph(tuple(module.encoder_widths), tuple(tuple(r) for r in module.radii),
                                 tuple(tuple(r) for r in module.still_radii),
                                 tuple(tuple(e) for e in module.estimator_widths))
        rebuilt.load_state_dict(module.state_dict())
    except (RuntimeError, ValueError, TypeError):
        return module
    rebuilt = channels_last(rebuilt.to(next(module.parameters()).device).eval())
    generator = torch.Generator().manual_seed(0)
    pair = torch.rand((2, 1, 8, 24, 24), generator=generator)
    # one run of the file's forward, unoptimised: the profiling executor's first runs cost about 0.5 s
    # on 2 CPU cores, paid by every registrar, and optimisation does not change what is computed
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        if (module(pair[:1], pair[1:]) - rebuilt(pair[:1], pair[1:])).abs().max() > 1e-3:
            return module
    return rebuilt
