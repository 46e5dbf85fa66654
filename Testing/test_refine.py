"""Per-pair refinement (instance optimisation) and the registrar that runs network + refinement."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from us3d.registration.fields import displacement_to_field, jacobian_determinant as itk_determinant
from us3d.registration.refine import RefinementSettings, jacobian_determinant, refine, unfold
from us3d.registration.voxelmorph import transform


def _speckle(shape=(16, 64, 64), seed=0) -> torch.Tensor:
    """Smoothed random texture with blobs: something to register, (1, 1, k, j, i)."""
    rng = np.random.default_rng(seed)
    volume = sitk.GetImageFromArray(rng.normal(size=shape).astype(np.float32))
    volume = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(volume, 1.5))
    return torch.from_numpy(volume)[None, None]


def _smooth_deformation(shape) -> torch.Tensor:
    """A smooth, non-uniform displacement (voxels, channels (k, j, i)) of up to about 2 voxels."""
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    return torch.stack([0.4 * torch.sin(i / 12.0),
                        1.5 * torch.cos(i / 15.0) + 0.3,
                        1.2 * torch.sin(j / 14.0) - 0.02 * (k - shape[0] / 2)])[None]


def _error(estimate, truth, margin=4):
    inner = (slice(None), slice(None), slice(2, -2), slice(margin, -margin), slice(margin, -margin))
    return float((estimate - truth)[inner].pow(2).sum(1).sqrt().mean())


def test_refinement_recovers_a_known_smooth_deformation():
    moving = _speckle()
    truth = _smooth_deformation(moving.shape[2:])
    fixed = transform(moving, truth)  # fixed(x) = moving(x + truth(x))
    start = torch.zeros_like(truth)
    settings = RefinementSettings(steps=60, levels=(2, 1), level_share=(0.5, 0.5))
    found = refine(fixed, moving, start, (0.8, 0.3, 0.4), settings)
    assert _error(start, truth) > 1.2
    assert _error(found, truth) < 0.25 * _error(start, truth)


@pytest.mark.parametrize("shape", [(6, 9, 8), (1, 9, 8)])
def test_jacobian_determinant_matches_itk_edges_included(shape):
    displacement = torch.from_numpy(np.random.default_rng(1).normal(0, 0.6, (1, 3) + shape).astype(np.float32))
    reference = sitk.GetImageFromArray(np.zeros(shape, np.float32))
    reference.SetSpacing((0.4, 0.3, 0.8))
    theirs = itk_determinant(displacement_to_field(displacement[0].numpy().astype(np.float64), reference))
    np.testing.assert_allclose(jacobian_determinant(displacement)[0].numpy(), theirs, atol=1e-5)


def test_unfold_removes_folds_and_leaves_the_rest_alone():
    shape = (12, 40, 40)
    smooth = _smooth_deformation(shape)
    folded = smooth.clone()
    folded[0, 2, 4:8, 18:22, 18:22] += torch.tensor([2.5, -2.5, 2.5, -2.5]).view(1, 1, 4)  # alternating along i
    assert bool((jacobian_determinant(folded) <= 0).any())
    fixed = unfold(folded)
    assert not bool((jacobian_determinant(fixed) <= 0).any())
    far = torch.ones(shape, dtype=torch.bool)
    far[:12, 12:28, 12:28] = False  # more than about 4 voxels from the fold
    assert float((fixed - folded)[0][:, far].abs().max()) < 1e-3


def test_unfold_clears_a_fold_on_a_face_of_the_volume():
    """Most folds left on validation pairs lay on the volume's faces."""
    shape = (8, 40, 40)
    folded = _smooth_deformation(shape)
    folded[0, 0, 0, 10:30, 10:30] += 3.0  # the first slice pushed past the second
    assert bool((jacobian_determinant(folded) <= 0).any())
    assert not bool((jacobian_determinant(unfold(folded)) <= 0).any())


def test_the_refinements_unfold_clears_a_fold_wider_than_sixteen_passes_reach():
    """A fold over many voxels (as on real freehand frames that no deformation explains) needs the
    wider Gaussians of later passes."""
    shape = (4, 40, 60)
    i = torch.arange(shape[2], dtype=torch.float32).view(1, 1, -1).expand(shape)
    folded = torch.zeros((1, 3) + shape)
    folded[0, 2] = -16.0 * torch.tanh((i - 30) / 8.0)  # reversed (det J down to -1) over 15 voxels
    assert float((jacobian_determinant(unfold(folded, 16)) <= 0).float().mean()) > 0.1
    passes = RefinementSettings().unfold_passes
    assert not bool((jacobian_determinant(unfold(folded, passes)) <= 0).any())


def _unfold_over_the_whole_volume(displacement, passes=16, margin=0.05):
    """unfold's definition, pass by pass over every voxel (what the box-by-box version must equal)."""
    from us3d.registration.refine import _gaussian

    sigma = 1.0
    for done in range(passes):
        folded = (jacobian_determinant(displacement) <= margin).to(displacement.dtype)[:, None]
        if not bool(folded.any()):
            break
        weight = (4 * _gaussian(folded, sigma)).clamp(max=1.0)
        displacement = displacement + weight * (_gaussian(displacement, sigma) - displacement)
        if done % 4 == 3:
            sigma *= 1.5
    return displacement


@pytest.mark.parametrize("passes", [1, 5, 16])
def test_unfold_box_by_box_equals_passes_over_the_whole_volume(passes):
    shape = (10, 48, 44)
    folded = _smooth_deformation(shape)
    folded[0, 2, 4:7, 18:22, 30:34] += torch.tensor([2.5, -2.5, 2.5, -2.5]).view(1, 1, 4)  # inside
    folded[0, 0, 0, 3:9, 5:12] += 3.0  # on a face
    folded[0, 1, 5, 40:46, 2:6] += torch.tensor([3.0, -3.0, 3.0, -3.0, 3.0, -3.0]).view(6, 1)  # near a corner
    expected = _unfold_over_the_whole_volume(folded, passes)
    found = unfold(folded, passes)
    assert float((found - expected).abs().max()) < 1e-5
    assert not torch.equal(found, folded)


def test_zero_steps_leave_the_initial_displacement_unchanged():
    moving = _speckle((8, 32, 32))
    initial = torch.randn(1, 3, 8, 32, 32)
    assert refine(moving, moving, initial, (0.8, 0.3, 0.4), RefinementSettings(steps=0)) is initial


def test_refinement_keeps_a_sliding_interface_sharper_than_diffusion():
    """Tissue above a horizontal interface moves 2 voxels along i, tissue below does not: the
    Charbonnier regulariser keeps the jump where diffusion smears it over the control spacing."""
    moving = _speckle((16, 64, 64), seed=3)
    truth = torch.zeros(1, 3, 16, 64, 64)
    truth[:, 2, :, :24] = 2.0
    fixed = transform(moving, truth)
    errors = {}
    for sliding in (True, False):
        settings = RefinementSettings(steps=60, levels=(2, 1), level_share=(0.5, 0.5), sliding=sliding)
        found = refine(fixed, moving, torch.zeros_like(truth), (0.8, 0.3, 0.4), settings)
        band = (slice(None), slice(None), slice(2, -2), slice(18, 30), slice(4, -4))  # 6 voxels either side
        errors[sliding] = float((found - truth)[band].pow(2).sum(1).sqrt().mean())
    assert errors[True] < errors[False]


def _folded_fraction(displacement: torch.Tensor) -> float:
    """Fraction of voxels with Jacobian determinant <= 0 of a (1, 3, k, j, i) voxel displacement."""
    from us3d.registration.fields import jacobian_determinant

    field = sitk.GetImageFromArray(displacement[0].permute(1, 2, 3, 0).flip(-1).double().numpy(), isVector=True)
    return float(np.mean(jacobian_determinant(field) <= 0))


def test_a_shift_out_of_the_volume_neither_folds_nor_drags_the_field():
    """Fixed = moving shifted by 6 voxels along i: a sixth of the fixed volume has no source inside
    the moving one. Started from a 5-voxel shift (as a rigid step would give), the refinement finds
    the rest: only the voxels whose source is inside count in the image term, and folding is
    penalised, so the field stays a shift and does not fold at the edge."""
    scene = _speckle((12, 48, 54), seed=5)
    moving, fixed = scene[..., :48].contiguous(), scene[..., 6:].contiguous()  # new tissue enters at i >= 42
    truth = torch.zeros(1, 3, 12, 48, 48)
    truth[:, 2] = 6.0
    start = truth * 5 / 6
    found = refine(fixed, moving, start, (0.8, 0.3, 0.4), RefinementSettings(steps=60, levels=(2, 1),
                                                                            level_share=(0.5, 0.5)))
    inner = (slice(None), slice(None), slice(2, -2), slice(4, -4), slice(4, 36))  # source inside
    assert float((found - truth)[inner].pow(2).sum(1).sqrt().mean()) < 0.5
    assert _folded_fraction(found) < 0.001
    unpenalised = RefinementSettings(steps=60, levels=(2, 1), level_share=(0.5, 0.5), folding_weight=0.0)
    assert _folded_fraction(refine(fixed, moving, start, (0.8, 0.3, 0.4), unpenalised)) >= _folded_fraction(found)


def _pair():
    from us3d.phantom import simulate_sequence

    phantom = simulate_sequence(3, seed=9150)
    images = []
    for t in (2, 0):
        image = sitk.GetImageFromArray(phantom.bmode[t].astype(np.float32))
        image.SetSpacing(phantom.spacing)
        images.append(image)
    truth = sitk.GetImageFromArray(phantom.displacement[2].astype(np.float64), isVector=True)
    truth.SetSpacing(phantom.spacing)
    return images[0], images[1], truth


def test_zero_refinement_steps_give_the_pure_network():
    from us3d.models.bundle import load_model
    from us3d.registration.pairs import Registrar, RegistrationSettings

    fixed, moving, _ = _pair()
    registrar = Registrar(RegistrationSettings(refine_steps=0, device="cpu"))
    network = load_model("voxelmorph").module
    with torch.inference_mode():
        expected = network(torch.from_numpy(sitk.GetArrayFromImage(fixed))[None, None],
                           torch.from_numpy(sitk.GetArrayFromImage(moving))[None, None])
    # the registrar runs the file's network rebuilt with the compiled cost volumes: the same to float rounding
    np.testing.assert_allclose(registrar.displacement(fixed, moving).numpy(), expected.numpy(), atol=1e-4)


def test_the_registrar_refines_with_the_settings_it_is_given():
    """`Registrar(settings, refinement)`: the refinement's settings but its steps, which stay the
    registration settings' own; its local normalisation reaches the registration."""
    from us3d.registration.pairs import Registrar, RegistrationSettings

    fixed, moving, _ = _pair()
    settings = RegistrationSettings(method="translation", refine_steps=6, device="cpu")
    plain = Registrar(settings, RefinementSettings(steps=99, local_normalisation=0.0))
    default = Registrar(settings)
    assert plain.refinement == RefinementSettings(steps=6, local_normalisation=0.0)
    assert default.refinement == RefinementSettings(steps=6)
    assert not torch.equal(plain.displacement(fixed, moving), default.displacement(fixed, moving))


def test_the_registrar_takes_depth_neighbours_only_when_asked(monkeypatch):
    """The depth-neighbour step is off by default (it raised the worst pairs on validation sequences);
    `Registrar(..., depth_neighbours={...})` runs it once a pair with those settings."""
    from us3d.registration import layers
    from us3d.registration.pairs import Registrar, RegistrationSettings

    calls = []
    original = layers.with_depth_neighbours

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(layers, "with_depth_neighbours", counted)
    fixed, moving, _ = _pair()
    settings = RegistrationSettings(method="translation", refine_steps=6, device="cpu")
    Registrar(settings).displacement(fixed, moving)
    assert calls == []
    field = Registrar(settings, depth_neighbours={"margin": 0.2}).displacement(fixed, moving)
    assert calls == [{"margin": 0.2}] and bool(torch.isfinite(field).all())


def test_local_normalisation_gives_dark_and_bright_speckle_one_scale():
    """Two layers with different means and speckle contrasts (half the other's) come out with zero mean and one
    scale: what is left is the speckle, not which layer is brighter; the flat region without data stays
    about 0."""
    from us3d.registration.refine import locally_normalised
    from us3d.registration.voxelmorph import normalised

    texture = _speckle((8, 64, 64), 3)
    texture = texture / texture.std()
    volume = 60.0 + 10.0 * texture
    volume[:, :, :, :32] = 30.0 + 5.0 * texture[:, :, :, :32]  # a dark layer
    volume[:, :, :, :, :16] = 0.0  # no data
    out = locally_normalised(volume, 3.0)[0, 0]
    dark, bright = out[2:-2, 8:24, 24:-4], out[2:-2, 40:-4, 24:-4]
    assert 0.6 < float(dark.std()) < 1.1 and 0.6 < float(bright.std()) < 1.1, (dark.std(), bright.std())
    assert float(dark.std()) > 0.75 * float(bright.std())  # normalised as a whole: 0.5
    assert abs(float(dark.mean())) < 0.1 and abs(float(bright.mean())) < 0.1
    assert float(out[:, :, :6].abs().max()) < 0.05
    plain = normalised(volume)[0, 0]
    assert float(plain[2:-2, 8:24, 24:-4].std()) < 0.6 * float(plain[2:-2, 40:-4, 24:-4].std())
    assert float(plain[2:-2, 40:-4, 24:-4].mean() - plain[2:-2, 8:24, 24:-4].mean()) > 1.0  # the local one removes it
    assert torch.equal(locally_normalised(volume, 0.0), normalised(volume))


def test_network_and_refinement_track_simulated_breathing():
    """The default (network + refinement) on a held-out simulated pair: the error is a small
    fraction of the motion, below the network alone's, and nothing folds."""
    from us3d.registration.pairs import Registrar, RegistrationSettings

    fixed, moving, truth = _pair()
    motion = float(np.linalg.norm(sitk.GetArrayFromImage(truth), axis=-1).mean())
    refined = Registrar(RegistrationSettings(device="cpu")).register_pair(fixed, moving, truth)
    network = Registrar(RegistrationSettings(device="cpu", refine_steps=0)).register_pair(fixed, moving, truth)
    assert refined.endpoint_error[0] < 0.2 * motion
    assert refined.endpoint_error[0] < network.endpoint_error[0]
    assert refined.folding < 1e-3 and refined.mse_after < refined.mse_before


def test_pair_figures_from_the_voxel_displacement_equal_itks():
    """The registrar warps and measures folding from the voxel displacement in compiled kernels; the
    figures and the warped volume are ITK's, from the field in mm."""
    from us3d.registration.fields import folding_fraction, warp
    from us3d.registration.pairs import Registrar, RegistrationSettings, intensity_mse

    fixed, moving, _ = _pair()
    result = Registrar(RegistrationSettings(device="cpu", refine_steps=4)).register_pair(fixed, moving)
    # the compiled warp gives ITK's resampled values to about 6e-8, float32 rounding: the MSEs agree to 1e-7
    assert (result.mse_before, result.mse_after) == pytest.approx(intensity_mse(fixed, moving, result.field), rel=1e-7)
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.warped),
                               sitk.GetArrayFromImage(warp(moving, result.field)), atol=1e-4)
    assert result.folding == folding_fraction(result.field)


@pytest.mark.parametrize("settings, message", [({"method": "bspline"}, "method must be one of"),
                                               ({"preprocessing": "median"}, "pre-processing must be one of"),
                                               ({"refine_steps": -1}, "refine steps"),
                                               ({"model": "unet-obnlm"}, "not a registration model")])
def test_registrar_refuses_bad_settings(settings, message):
    from us3d.errors import InputError
    from us3d.registration.pairs import Registrar, RegistrationSettings

    with pytest.raises(InputError, match=message):
        Registrar(RegistrationSettings(device="cpu", **settings))


@pytest.mark.parametrize("shape", [(5, 17, 12), (1, 9, 8), (4, 1, 6)])
def test_the_gathering_warp_equals_the_spatial_transformer(shape):
    """The refinement's torch path warps its volume and gradients by gathering the cell corners once
    for all channels; it must give what grid_sample gives, singleton axes and points outside included
    (the compiled linearisation is compared with this path)."""
    from us3d.registration.refine import _warp

    generator = torch.Generator().manual_seed(3)
    volume = torch.randn(2, 4, *shape, generator=generator)
    displacement = 3 * torch.randn(2, 3, *shape, generator=generator)
    expected = transform(volume, displacement)
    assert torch.allclose(_warp(volume, displacement), expected, atol=1e-5)


def test_separable_maps_equal_torch_interpolation_and_a_replicate_padded_blur():
    """Control-grid upsampling and the Gaussian are matrix products along each axis; the same
    linear maps as trilinear interpolation (corners aligned) and a convolution with edge values."""
    from us3d.registration.refine import _gaussian, _linear_maps
    from us3d.registration.separable import apply

    generator = torch.Generator().manual_seed(4)
    control = torch.randn(1, 3, 3, 6, 5, generator=generator)
    size = [7, 23, 17]
    expected = torch.nn.functional.interpolate(control, size=size, mode="trilinear", align_corners=True)
    assert torch.allclose(apply(control, _linear_maps([3, 6, 5], size, control)), expected, atol=1e-5)
    volume = torch.randn(1, 2, 6, 11, 9, generator=generator)
    sigma, radius = 0.8, 2
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    blurred = volume
    for axis in range(3):
        padded = torch.nn.functional.pad(blurred, [radius, radius] * 3, mode="replicate")
        inner = [slice(radius, -radius)] * 3
        inner[axis] = slice(None)
        padded = padded[(slice(None), slice(None), *inner)]
        n = blurred.shape[2 + axis]
        blurred = sum(taps[t] * padded.narrow(2 + axis, t, n) for t in range(2 * radius + 1))
    assert torch.allclose(_gaussian(volume, sigma), blurred, atol=1e-5)


@pytest.mark.parametrize("replicate", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 6, 11, 9), (1, 1, 1, 4, 30)])
def test_the_compiled_gaussian_equals_the_matrix_products(shape, replicate):
    """separable.gaussian's compiled taps (float32, CPU) give the dense matrix products (float64), edge
    values or zeros outside, on axes shorter than the kernel and of one sample too."""
    from us3d.registration.separable import apply, gaussian, gaussian_matrix

    volume = torch.randn(*shape, generator=torch.Generator().manual_seed(11))
    for sigma in (0.5, 2.0):
        found = gaussian(volume, sigma, replicate)
        as64 = volume.double()
        expected = apply(as64, [gaussian_matrix(n, sigma, as64, replicate) for n in shape[2:]])
        assert found.dtype == torch.float32 and found.shape == volume.shape
        np.testing.assert_allclose(found.numpy(), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_linearised_image_term_and_its_gradient(dtype):
    """One pass makes the expansion's sum of squares for a change on the control grid, and its gradient
    there (a compiled kernel for float32 on the CPU, torch otherwise); both equal autograd through the
    plain expression, with the change interpolated onto the dense grid by `_control_to_dense`."""
    from us3d.registration.refine import _LinearisedImageTerm, _control_to_dense, _linear_maps

    generator = torch.Generator().manual_seed(6)
    dense = [5, 9, 7]
    change = torch.randn(2, 3, 2, 4, 3, generator=generator, dtype=dtype).requires_grad_(True)
    difference = torch.randn(2, 1, *dense, generator=generator, dtype=dtype)
    slopes = torch.randn(2, 3, *dense, generator=generator, dtype=dtype)
    found = _LinearisedImageTerm.apply(change, difference, slopes, _linear_maps([2, 4, 3], dense, change))
    (gradient,) = torch.autograd.grad(3 * found, change)
    plain = change.detach().clone().requires_grad_(True)
    expected = (difference + (slopes * _control_to_dense(plain, dense)).sum(1, keepdim=True)).pow(2).sum()
    (expected_gradient,) = torch.autograd.grad(3 * expected, plain)
    assert torch.allclose(found, expected, rtol=1e-5)
    assert torch.allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-4)


def test_the_compiled_linearisation_equals_torch():
    """The compiled one-pass expansion (float32, CPU) gives torch's composition of the control grid's
    interpolation, the warp and the inside mask (float64), on a displacement that sends some sources outside."""
    from us3d.registration.refine import _linear_maps, _linearise, _with_gradient

    generator = torch.Generator().manual_seed(8)
    dense, grid = [6, 10, 9], [3, 4, 4]
    start = 1.5 * torch.randn(1, 3, *dense, generator=generator)
    control = torch.randn(1, 3, *grid, generator=generator)
    moving = _with_gradient(torch.rand(1, 1, *dense, generator=generator))
    fixed = torch.rand(1, 1, *dense, generator=generator)
    found = _linearise(start, control, _linear_maps(grid, dense, control), moving, fixed)
    as64 = [t.double() for t in (start, control, moving, fixed)]
    expected = _linearise(as64[0], as64[1], _linear_maps(grid, dense, as64[1]), as64[2], as64[3])
    assert 0 < float(expected[2]) < np.prod(dense)  # some sources fall outside
    assert float(found[2]) == float(expected[2])
    for a, b in zip(found[:2], expected[:2]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_the_compiled_jacobian_determinant_equals_torch():
    from us3d.registration.refine import jacobian_determinant

    displacement = torch.randn(2, 3, 4, 7, 5, generator=torch.Generator().manual_seed(9))
    np.testing.assert_allclose(jacobian_determinant(displacement).numpy(),
                               jacobian_determinant(displacement.double()).numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sliding", [True, False])
def test_the_compiled_control_terms_equal_torch(sliding):
    """The compiled penalty and folding terms (float32, CPU) and their gradient equal autograd through
    torch's `_penalty` and `_folding` (float64), on a grid that folds in places, batch of two included."""
    from us3d.registration.refine import _control_terms, _folding

    generator = torch.Generator().manual_seed(10)
    grid = [3, 5, 4]
    settings = RefinementSettings(sliding=sliding, regularisation_weight=0.3, folding_weight=50.0)
    control = torch.randn(2, 3, *grid, generator=generator)
    start = 0.8 * torch.randn(2, 3, *grid, generator=generator)
    to_mm = torch.tensor([0.8, 0.3, 0.4]).view(1, 3, 1, 1, 1)
    to_control = torch.tensor([0.5, 0.25, 0.2]).view(1, 3, 1, 1, 1)
    control_mm = [2.0, 1.5, 1.2]
    found_control = control.clone().requires_grad_(True)
    found = _control_terms(found_control, start, to_mm, control_mm, to_control, settings)
    (found_gradient,) = torch.autograd.grad(2 * found, found_control)
    plain = control.double().requires_grad_(True)
    expected = _control_terms(plain, start.double(), to_mm.double(), control_mm, to_control.double(), settings)
    (expected_gradient,) = torch.autograd.grad(2 * expected, plain)
    assert float(_folding(start.double() + control.double() * to_control.double())) > 0  # some cells fold
    assert found.dtype == torch.float32
    np.testing.assert_allclose(float(found.detach()), float(expected.detach()), rtol=1e-5)
    np.testing.assert_allclose(found_gradient.numpy(), expected_gradient.numpy(), rtol=1e-4, atol=1e-5)
