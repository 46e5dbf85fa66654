"""Per-pair refinement of a displacement (instance optimisation), as the best Learn2Reg entries do
after their network.

A residual displacement on a coarse control grid, trilinearly interpolated (a smooth
parametrisation), is added to the initial displacement (the network's, the rigid step's or the
previous frame's) and optimised by Adam for a few to a few dozen steps per resolution level:

    minimise  MSE(fixed, moving(x + u0(x) + r(x)))  +  regularisation_weight * R(r)

on both volumes normalised (locally by default: `locally_normalised`), lightly smoothed (Gaussian,
`smoothing` voxels) and reduced in-plane (each level's factor; the first level is the coarsest). R is the mean of
|grad r| over the control grid in mm per mm: with `sliding` (default) a Charbonnier (about
total-variation) penalty, which lets the displacement jump where the abdominal wall slides over
the liver instead of smearing the shear over the control spacing; without it the squared
gradient (diffusion). A penalty on negative Jacobian determinants and, last, `unfold` (smoothing
only where the field still folds) keep the mapping invertible. The same torch code runs on CPU
and CUDA.

Tensors are (batch, channel, k, j, i); displacements in voxels of the input grid, channels (k, j, i).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.optim.adam import adam

from us3d.registration import separable
from us3d.registration.voxelmorph import normalised, transform


@dataclasses.dataclass(frozen=True)
class RefinementSettings:
    """Settings of `refine`. The defaults were chosen on validation sequences only, never the
    benchmark's (benchmarks/tune_refinement.py, RESULTS-refinement-tuning.md): from the network, a
    half-resolution then a full-resolution level, light smoothing (speckle moves with the tissue and
    is what the image term matches), coarse control points and a small step.

    Parameters
    ----------
    steps : Adam steps in all (0: no refinement), shared out over the levels by `level_share`.
    levels : in-plane reduction of each resolution level, coarsest first (2: half in-plane resolution).
    level_share : fraction of the steps spent at each level.
    control_spacing : control-point spacing (k, j, i) in voxels of each level's grid.
    learning_rate : Adam step size, voxels of the level's grid.
    smoothing : Gaussian sigma, voxels of the input grid, applied before reduction.
    regularisation_weight : weight of R (the penalty on the residual's gradient, mm per mm).
    sliding : R is a Charbonnier (about total-variation) penalty that lets the field slide (True) or
        the squared gradient, diffusion (False).
    folding_weight : weight of a penalty on folding: the mean of max(0, 0.1 - det J)^2 over the
        control grid, J the Jacobian of x -> x + u(x); 0 turns it off.
    local_normalisation : Gaussian sigma, voxels, of the local mean and standard deviation that both volumes
        are normalised by (`locally_normalised`), so that the image term matches speckle wherever it is,
        not mostly the edges between brighter and darker tissue; 0 normalises each volume as a whole
        (chosen on validation and development sequences: benchmarks/tune_registration.py).
    initial_smoothing : Gaussian sigma, voxels, applied to the initial displacement first (a network's
        field is noisier than its errors are smooth: on held-out breathing sigma 2 lowered both its
        error and its folding); 0 keeps it as given.
    linearise_every : the warped moving volume and its gradient are computed once every this many
        steps and the steps between use their first-order expansion (Gauss-Newton's model of the
        image term), about 3x cheaper per step; 1 warps at every step.
    unfold_passes : at most this many passes of `unfold` on the result (0: none). Its sigma grows 1.5x
        every 4 passes while folds remain, so 32 passes reach about 25 voxels, wide enough for the
        folds that a pair of real freehand frames kept after 16 passes (3.3% of its voxels; 0.007%
        after 32); a pair without folds stops after the first pass.
    """

    steps: int = 24
    levels: tuple[int, ...] = (2, 1)
    level_share: tuple[float, ...] = (0.5, 0.5)
    control_spacing: tuple[int, int, int] = (4, 4, 4)
    learning_rate: float = 0.15
    smoothing: float = 0.5
    local_normalisation: float = 3.0
    regularisation_weight: float = 0.1
    sliding: bool = True
    folding_weight: float = 100.0
    initial_smoothing: float = 2.0
    linearise_every: int = 4
    unfold_passes: int = 32


class _Adam:
    """Adam with torch's defaults on one tensor, through `torch.optim.adam.adam`'s fused kernel: what
    `torch.optim.Adam([parameter], lr, fused=True)` runs, without constructing the optimiser, which
    imports torch._dynamo (2.3 s in each new process: each CLI command and background run)."""

    def __init__(self, parameter: torch.Tensor, learning_rate: float):
        self.parameter, self.learning_rate = parameter, learning_rate
        self.first, self.second = torch.zeros_like(parameter), torch.zeros_like(parameter)
        self.count = torch.zeros((), dtype=torch.float32, device=parameter.device)

    def step(self) -> None:
        with torch.no_grad():
            adam([self.parameter], [self.parameter.grad], [self.first], [self.second], [], [self.count], fused=True,
                 amsgrad=False, beta1=0.9, beta2=0.999, lr=self.learning_rate, weight_decay=0.0, eps=1e-8,
                 maximize=False)


def locally_normalised(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """A (b, c, k, j, i) `volume` normalised (zero mean, unit std as a whole), less its local mean and divided
    by its local standard deviation, both Gaussian-weighted (`sigma` voxels): in a squared difference each
    region's speckle then weighs the same, however bright or dark its tissue. Where the volume is flat
    (outside a sector scan) it stays about 0. sigma 0: normalised as a whole only."""
    volume = normalised(volume)
    if sigma <= 0:
        return volume
    detail = volume - separable.gaussian(volume, sigma, True)
    return detail / (separable.gaussian(detail * detail, sigma, True) + 0.01).sqrt()


def _gaussian(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (b, c, k, j, i) along every axis, edge values outside."""
    if sigma <= 0:
        return volume
    return separable.gaussian(volume, sigma, True)


def _with_gradient(volume: torch.Tensor) -> torch.Tensor:
    """(b, 4, k, j, i): the volume and its central differences along k, j, i (one-sided at the edges)."""
    gradients = [torch.gradient(volume, dim=2 + axis)[0] if volume.shape[2 + axis] > 1 else torch.zeros_like(volume)
                 for axis in range(3)]
    return torch.cat([volume] + gradients, 1)


def _warp(volume: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """volume(x + u(x)) for a (b, c, k, j, i) volume and a (b, 3, k, j, i) displacement in voxels:
    trilinear, edge values outside, what `us3d.registration.voxelmorph.transform` gives, without
    gradients, by gathering each cell's corners (faster than grid_sample with several channels). On
    the CPU in float32 the refinement does not call it: `_linearise`'s compiled kernel warps there."""
    b, c, size_k, size_j, size_i = volume.shape
    sizes, strides = [size_k, size_j, size_i], [size_j * size_i, size_i, 1]
    fractions, steps = [], []
    index = torch.zeros((), dtype=torch.long, device=volume.device)
    for axis in range(3):
        n = sizes[axis]
        shape = [1, 1, 1]
        shape[axis] = n
        position = (torch.arange(n, dtype=displacement.dtype, device=displacement.device).view(shape)
                    + displacement[:, axis]).clamp(0, n - 1)
        low = position.floor().clamp(max=max(n - 2, 0))
        fractions.append((position - low)[:, None])
        index = index + low.long() * strides[axis]
        steps.append(strides[axis] if n > 1 else 0)
    flat = volume.reshape(b, c, -1)
    index = index.reshape(b, 1, -1).expand(b, c, -1)
    step_k, step_j, step_i = steps
    fraction_k, fraction_j, fraction_i = fractions

    def corner(offset: int) -> torch.Tensor:  # the value at the cell's corner `offset` voxels on
        return torch.gather(flat[:, :, offset:], 2, index).view(volume.shape)

    def along_i(offset: int) -> torch.Tensor:  # interpolated along i on the cell's edge at `offset`
        return torch.lerp(corner(offset), corner(offset + step_i), fraction_i)

    low_k = torch.lerp(along_i(0), along_i(step_j), fraction_j)
    high_k = torch.lerp(along_i(step_k), along_i(step_k + step_j), fraction_j)
    return torch.lerp(low_k, high_k, fraction_k)


def _interpolation_axes(control: list[int], dense: list[int]) -> list:
    """The compiled kernels' description of `_control_to_dense` from a control grid of size `control`
    to a dense grid of size `dense`: (low, weight) along k, then j, then i (`separable.linear_weights`)."""
    axes = []
    for n_out, n_in in zip(dense, control):
        low, weight = separable.linear_weights(n_out, n_in)
        axes += [low.numpy(), weight.float().numpy()]
    return axes


class _LinearisedImageTerm(torch.autograd.Function):
    """sum over voxels of (difference + slopes . change)^2, the image term's first-order expansion
    about the anchor, for a change of displacement given on the control grid (b, 3, kc, jc, ic) and
    interpolated onto the dense grid of `difference` (b, 1, k, j, i) and `slopes` (b, 3, k, j, i) by
    `to_dense` (`_linear_maps`, as `_control_to_dense` does); its gradient with respect to the control
    grid is made in the same pass. For float32 on the CPU a compiled kernel interpolates on the fly
    (with `axes`, `_interpolation_axes`, made here when not given) and never forms the dense change
    (about ten passes over the volume become one); elsewhere torch's matrix products."""

    @staticmethod
    def forward(ctx, change: torch.Tensor, difference: torch.Tensor, slopes: torch.Tensor,
                to_dense: list[torch.Tensor], axes: list | None = None) -> torch.Tensor:
        dense, control = list(difference.shape[2:]), list(change.shape[2:])
        if change.device.type == "cpu" and change.dtype == difference.dtype == slopes.dtype == torch.float32:
            from us3d.registration._refine_cpu import gather_planes, linearised_term_on_control

            axes = _interpolation_axes(control, dense) if axes is None else axes
            gradient = torch.empty_like(change, memory_format=torch.contiguous_format)
            planes = torch.empty((dense[0], 2, 3, control[1], control[2]), dtype=torch.float32).numpy()
            total = 0.0
            for item in range(change.shape[0]):
                total += linearised_term_on_control(change[item].contiguous().numpy(),
                                                    difference[item, 0].contiguous().numpy(),
                                                    slopes[item].contiguous().numpy(), *axes, planes)
                gather_planes(planes, axes[0], gradient[item].numpy())
            ctx.save_for_backward(gradient)
            return torch.tensor(total, dtype=change.dtype)
        residual = difference + (slopes * separable.apply(change, to_dense)).sum(1, keepdim=True)
        ctx.save_for_backward(separable.apply(2 * residual * slopes, [m.t() for m in to_dense]))
        return residual.pow(2).sum()

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return upstream * gradient, None, None, None, None


def _linearise(start: torch.Tensor, control: torch.Tensor, to_dense: list[torch.Tensor],
               moving_and_gradient: torch.Tensor, fixed: torch.Tensor,
               axes: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image term's expansion about u = start + the control grid on the dense grid:
    (difference moving(x + u) - fixed (b, 1, k, j, i), slopes: the moving volume's gradient there
    (b, 3, k, j, i), the number of voxels whose source x + u lies inside the volume); both zero where
    it lies outside. A compiled kernel for float32 on the CPU (one pass, the dense displacement never
    formed; `axes` as for `_LinearisedImageTerm`), torch elsewhere."""
    tensors = (start, control, moving_and_gradient, fixed)
    if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        from us3d.registration._refine_cpu import linearise

        axes = _interpolation_axes(list(control.shape[2:]), list(fixed.shape[2:])) if axes is None else axes
        difference = torch.empty_like(fixed, memory_format=torch.contiguous_format)
        slopes = torch.empty_like(start, memory_format=torch.contiguous_format)
        covered = 0.0
        for item in range(fixed.shape[0]):
            covered += linearise(start[item].contiguous().numpy(), control[item].contiguous().numpy(),
                                 moving_and_gradient[item].contiguous().numpy(), fixed[item, 0].contiguous().numpy(),
                                 *axes, difference[item, 0].numpy(), slopes[item].numpy())
        return difference, slopes, torch.tensor(max(covered, 1.0), dtype=fixed.dtype)
    displacement = start + separable.apply(control, to_dense)
    expansion = _warp(moving_and_gradient, displacement)
    inside = _source_inside(displacement)  # 0 or 1
    return inside * (expansion[:, :1] - fixed), inside * expansion[:, 1:], inside.sum().clamp(min=1.0)


def _reduce(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """Average over factor x factor in-plane blocks (j, i); sizes that do not divide keep their edge."""
    if factor == 1:
        return volume
    return F.avg_pool3d(volume, (1, factor, factor), ceil_mode=True, count_include_pad=False)


def resample_displacement(displacement: torch.Tensor, size: list[int]) -> torch.Tensor:
    """A (b, 3, k, j, i) voxel displacement resampled (trilinear) onto the grid of `size` that covers the
    same volume with voxels `old / size` times larger (as `_reduce` makes them), its components
    rescaled to those voxels."""
    old = displacement.shape[2:]
    if list(old) == list(size):
        return displacement
    resized = F.interpolate(displacement, size=size, mode="trilinear", align_corners=False)
    scale = torch.tensor([size[a] / old[a] for a in range(3)], dtype=displacement.dtype, device=displacement.device)
    return resized * scale.view(1, 3, 1, 1, 1)


def _control_to_dense(control: torch.Tensor, size: list[int]) -> torch.Tensor:
    """The control grid (values in voxels of the dense grid) interpolated onto the dense grid; the
    control points sit on the dense grid's corners and are evenly spaced between."""
    return separable.apply(control, _linear_maps(list(control.shape[2:]), size, control))


def _linear_maps(size_in: list[int], size_out: list[int], like: torch.Tensor) -> list[torch.Tensor]:
    """The three `separable.linear_matrix` of `_control_to_dense` from a grid of `size_in` to one of `size_out`."""
    return [separable.linear_matrix(n_out, n_in, like) for n_out, n_in in zip(size_out, size_in)]


def _penalty(control: torch.Tensor, spacing_mm: torch.Tensor, sliding: bool) -> torch.Tensor:
    """Mean gradient penalty of a (b, 3, k, j, i) control grid whose points are `spacing_mm` (k, j, i)
    apart, with displacements in mm."""
    total = torch.zeros((), dtype=control.dtype, device=control.device)
    for axis in range(3):
        if control.shape[2 + axis] < 2:
            continue
        gradient = torch.diff(control, dim=2 + axis) / spacing_mm[axis]
        squared = gradient.pow(2).sum(1)
        total = total + (torch.sqrt(squared + 1e-4).mean() if sliding else squared.mean())
    return total


class _CompiledControlTerms(torch.autograd.Function):
    """`_control_terms` for one float32 control grid on the CPU: value and gradient in one compiled pass."""

    @staticmethod
    def forward(ctx, control: torch.Tensor, start_on_control: torch.Tensor, to_mm: torch.Tensor,
                control_mm: list[float], to_control: torch.Tensor, settings: RefinementSettings) -> torch.Tensor:
        from us3d.registration._refine_cpu import control_terms

        gradient = torch.empty_like(control, memory_format=torch.contiguous_format)
        scales = [t.flatten().double().numpy() for t in (to_mm, torch.tensor(control_mm), to_control)]
        total = 0.0
        batch = control.shape[0]
        for item in range(batch):
            total += control_terms(control[item].detach().contiguous().numpy(),
                                   start_on_control[item].contiguous().numpy(), *scales,
                                   settings.regularisation_weight / batch, settings.sliding,
                                   settings.folding_weight / batch, gradient[item].numpy())
        ctx.save_for_backward(gradient)
        return torch.tensor(total, dtype=control.dtype)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return upstream * gradient, None, None, None, None, None


def _control_terms(control: torch.Tensor, start_on_control: torch.Tensor, to_mm: torch.Tensor,
                   control_mm: list[float], to_control: torch.Tensor, settings: RefinementSettings) -> torch.Tensor:
    """The terms of the loss on the control grid (b, 3, kc, jc, ic), points `control_mm` (k, j, i) apart:
    regularisation_weight * R(control * to_mm) + folding_weight * folding(start_on_control + control *
    to_control), to_mm and to_control (1, 3, 1, 1, 1) per channel. A compiled kernel for float32 on the
    CPU (`_refine_cpu.control_terms`), torch elsewhere."""
    if control.device.type == "cpu" and control.dtype == start_on_control.dtype == torch.float32:
        return _CompiledControlTerms.apply(control, start_on_control, to_mm, control_mm, to_control, settings)
    loss = settings.regularisation_weight * _penalty(control * to_mm, control_mm, settings.sliding)
    if settings.folding_weight > 0:
        loss = loss + settings.folding_weight * _folding(start_on_control + control * to_control)
    return loss


def _source_inside(displacement: torch.Tensor) -> torch.Tensor:
    """(b, 1, k, j, i) float, 1 where x + u(x) lies inside the grid: only there does the moving volume
    say anything (outside, the image term would pull the field back in and fold it)."""
    inside = torch.ones_like(displacement[:, :1])
    for axis in range(3):
        n = displacement.shape[2 + axis]
        position = torch.arange(n, dtype=displacement.dtype, device=displacement.device).view(
            [-1 if a == axis else 1 for a in range(3)]) + displacement[:, axis:axis + 1]
        inside = inside * ((position >= 0) & (position <= n - 1)).to(displacement.dtype)
    return inside


def _folding(displacement: torch.Tensor) -> torch.Tensor:
    """Mean of max(0, 0.1 - det J)^2, J the Jacobian of x -> x + u(x) by forward differences, for a
    (b, 3, k, j, i) displacement in voxels (the sign of det J does not depend on the voxel size)."""
    if min(displacement.shape[2:]) < 2:
        return torch.zeros((), dtype=displacement.dtype, device=displacement.device)
    u = displacement
    d = [torch.diff(u, dim=2 + axis) for axis in range(3)]  # d[axis][:, c]: d u_c / d x_axis
    d = [x[:, :, :u.shape[2] - 1, :u.shape[3] - 1, :u.shape[4] - 1] for x in d]
    return F.relu(0.1 - _determinant(d)).pow(2).mean()


def _determinant(derivatives: list[torch.Tensor]) -> torch.Tensor:
    """det(I + grad u) from derivatives[axis][:, c] = d u_c / d x_axis, each (b, 3, k, j, i)."""
    j = [[derivatives[a][:, c] + (1.0 if a == c else 0.0) for a in range(3)] for c in range(3)]  # j[c][a]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1]) - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """(b, k, j, i) det(I + grad u) for a (b, 3, k, j, i) displacement in voxels, channels (k, j, i);
    <= 0 where the mapping folds. Central differences with the edge values repeated outside, as
    ITK's DisplacementFieldJacobianDeterminantFilter (`us3d.registration.fields.folding_fraction`).
    A compiled kernel for float32 on the CPU (`_refine_cpu.jacobian_determinant`), torch elsewhere."""
    if displacement.device.type == "cpu" and displacement.dtype == torch.float32:
        from us3d.registration import _refine_cpu

        out = torch.empty((displacement.shape[0], *displacement.shape[2:]), dtype=torch.float32)
        for item in range(displacement.shape[0]):
            _refine_cpu.jacobian_determinant(displacement[item].contiguous().numpy(), out[item].numpy())
        return out
    derivatives = []
    for axis in range(3):
        pads = [0, 0, 0, 0, 0, 0]
        pads[4 - 2 * axis] = pads[5 - 2 * axis] = 1
        padded = F.pad(displacement, pads, mode="replicate")
        n = displacement.shape[2 + axis]
        derivatives.append((padded.narrow(2 + axis, 2, n) - padded.narrow(2 + axis, 0, n)) / 2)
    return _determinant(derivatives)


Box = list[tuple[int, int]]  # (start, stop) along k, j, i


def unfold(displacement: torch.Tensor, passes: int = 16, margin: float = 0.05) -> torch.Tensor:
    """The displacement smoothed only around its folds: each pass finds the voxels whose Jacobian
    determinant is <= `margin` and blends a Gaussian-smoothed displacement in, with a weight that is 1
    there and falls off over about two sigmas; sigma starts at 1 voxel and grows 1.5x every 4 passes
    while folds remain (folds on the volume's faces and in signal-free regions outside a sector need
    the wider reach); it stops early when none is left. Elsewhere the displacement is unchanged, so
    accuracy is kept where the field does not fold.

    Each pass works inside the box around the folds, grown by what its Gaussians reach, and the next
    pass looks for folds only where the field changed: the same result as passes over the whole
    volume (folds are few and local), at a fraction of the cost on large volumes."""
    sigma = 1.0
    shape = list(displacement.shape[2:])
    with torch.no_grad():
        within = [(0, n) for n in shape]
        mask = jacobian_determinant(displacement) <= margin  # the folds, over the box `within`
        box = _box_of(mask, within)
        if box is None:
            return displacement
        displacement = displacement.clone()
        for done in range(passes):
            # the weight is non-zero within `reach` of a fold and reads the field `reach` further on
            reach = separable.gaussian_radius(sigma)
            region = _grown(box, 2 * reach + 1, shape)
            inside = (slice(None), slice(None), *[slice(start, stop) for start, stop in region])
            # every fold lies in `box`, inside both `region` and `within`: the mask is pasted, not recomputed
            folded = torch.zeros((displacement.shape[0], 1, *[stop - start for start, stop in region]),
                                 dtype=displacement.dtype, device=displacement.device)
            folded[(slice(None), 0, *_offset(box, region))] = mask[(slice(None), *_offset(box, within))].to(
                displacement.dtype)
            weight = (4 * _gaussian(folded, sigma)).clamp(max=1.0)
            part = displacement[inside]
            displacement[inside] = part + weight * (_gaussian(part, sigma) - part)
            if done % 4 == 3:
                sigma *= 1.5
            within = _grown(region, 1, shape)  # where the determinant may have changed
            mask = _determinant_within(displacement, within) <= margin
            box = _box_of(mask, within)
            if box is None:
                break
    return displacement


def _offset(box: Box, within: Box) -> list[slice]:
    """Slices of `box` in the array that covers the box `within` (which contains it)."""
    return [slice(start - outer, stop - outer) for (start, stop), (outer, _) in zip(box, within)]


def _box_of(mask: torch.Tensor, within: Box) -> Box | None:
    """The bounds of the True voxels of a (b, k, j, i) mask that covers the box `within` of a volume, in
    that volume's voxels; None when there are none."""
    if not bool(mask.any()):
        return None
    box = []
    for axis in range(3):
        others = [d for d in range(4) if d != axis + 1]
        present = torch.nonzero(mask.any(dim=others[2]).any(dim=others[1]).any(dim=others[0])).flatten()
        box.append((within[axis][0] + int(present[0]), within[axis][0] + int(present[-1]) + 1))
    return box


def _grown(box: Box, by: int, shape: list[int]) -> Box:
    return [(max(0, start - by), min(n, stop + by)) for (start, stop), n in zip(box, shape)]


def _determinant_within(displacement: torch.Tensor, box: Box) -> torch.Tensor:
    """`jacobian_determinant` of the whole displacement, cropped to `box`, computed on the box and one
    voxel around it (central differences reach one voxel)."""
    shape = list(displacement.shape[2:])
    around = _grown(box, 1, shape)
    determinant = jacobian_determinant(
        displacement[(slice(None), slice(None), *[slice(start, stop) for start, stop in around])])
    return determinant[(slice(None), *_offset(box, around))]


def refine(fixed: torch.Tensor, moving: torch.Tensor, initial: torch.Tensor, spacing: tuple[float, float, float],
           settings: RefinementSettings = RefinementSettings()) -> torch.Tensor:
    """Refined displacement (1, 3, k, j, i), voxels, channels (k, j, i), from `initial` (same shape).

    Parameters
    ----------
    fixed, moving : (1, 1, k, j, i) volumes on one grid, any intensity scale.
    initial : (1, 3, k, j, i) displacement in voxels, channels (k, j, i): moving(x + initial(x)) is the
        starting alignment.
    spacing : voxel size (k, j, i) in mm.
    settings : see RefinementSettings.
    """
    if settings.steps <= 0:
        return initial
    if len(settings.levels) != len(settings.level_share):
        raise ValueError("levels and level_share need one entry each")
    full = list(fixed.shape[2:])
    with torch.no_grad():
        initial = _gaussian(initial, settings.initial_smoothing)
    with torch.no_grad():
        fixed_s = _gaussian(locally_normalised(fixed.float(), settings.local_normalisation), settings.smoothing)
        moving_s = _gaussian(locally_normalised(moving.float(), settings.local_normalisation), settings.smoothing)
    residual = torch.zeros_like(initial)
    shares = torch.tensor(settings.level_share, dtype=torch.float64)
    counts = torch.round(shares / shares.sum() * settings.steps).long().tolist()
    counts[-1] = settings.steps - sum(counts[:-1])
    for factor, count in zip(settings.levels, counts):
        if count <= 0:
            continue
        with torch.no_grad():
            level_fixed, level_moving = _reduce(fixed_s, factor), _reduce(moving_s, factor)
            size = list(level_fixed.shape[2:])
            start = resample_displacement(initial, size)
            control_size = [max(2, -(-(n - 1) // c) + 1) for n, c in zip(size, settings.control_spacing)]
            # the residual so far (from coarser levels) sampled at the control points
            control = _control_to_dense(resample_displacement(residual, size), control_size)
        control.requires_grad_(True)
        voxel_mm = [spacing[a] * full[a] / size[a] for a in range(3)]  # the level's voxel size (k, j, i)
        control_mm = [voxel_mm[a] * (size[a] - 1) / (control_size[a] - 1) for a in range(3)]
        to_mm = torch.tensor(voxel_mm, dtype=control.dtype, device=control.device).view(1, 3, 1, 1, 1)
        # folding is penalised on the control grid, in its own voxels (about 8x fewer points than the level)
        to_control = torch.tensor([(control_size[a] - 1) / max(size[a] - 1, 1) for a in range(3)],
                                  dtype=control.dtype, device=control.device).view(1, 3, 1, 1, 1)
        with torch.no_grad():
            start_on_control = _control_to_dense(start, control_size) * to_control
        optimiser = _Adam(control, settings.learning_rate)
        to_dense = _linear_maps(control_size, size, control)
        axes = _interpolation_axes(control_size, size)  # the same, for the compiled kernels
        moving_and_gradient = _with_gradient(level_moving) if settings.linearise_every > 1 else level_moving
        anchor = difference = slopes = torch.zeros(0)
        covered = torch.ones(())
        for step in range(count):
            if settings.linearise_every <= 1:
                displacement = start + separable.apply(control, to_dense)
                warped = transform(level_moving, displacement)
                with torch.no_grad():
                    inside = _source_inside(displacement)
                image = (inside * (warped - level_fixed).pow(2)).sum() / inside.sum().clamp(min=1.0)
            else:
                if step % settings.linearise_every == 0:  # moving(x + u) and its gradient there
                    with torch.no_grad():
                        anchor = control.detach().clone()
                        difference, slopes, covered = _linearise(start, anchor, to_dense, moving_and_gradient,
                                                                 level_fixed, axes)
                image = _LinearisedImageTerm.apply(control - anchor, difference, slopes, to_dense, axes) / covered
            loss = image + _control_terms(control, start_on_control, to_mm, control_mm, to_control, settings)
            control.grad = None
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            residual = resample_displacement(separable.apply(control.detach(), to_dense), full)
    return unfold(initial + residual, settings.unfold_passes) if settings.unfold_passes > 0 else initial + residual
