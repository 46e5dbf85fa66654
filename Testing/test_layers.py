"""Translations of depth bands (us3d.registration.layers): the depth axis from the speckle, and a layer
that stays while the tissue below it moves."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from us3d.registration.layers import (SLAB_PLACEMENTS, band_translations, data_mask, depth_axis,
                                      with_depth_neighbours, with_layer_translations)
from us3d.registration.voxelmorph import transform


def _texture(shape, seed, sigma=1.0):
    rng = np.random.default_rng(seed)
    noise = sitk.GetImageFromArray(rng.normal(size=shape).astype(np.float32))
    return torch.from_numpy(sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, sigma)))[None, None]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_depth_axis_is_where_speckle_decorrelates_faster(seed):
    """Simulated B-mode (depth along j) and the same volume with j and i swapped (depth along i)."""
    from us3d.phantom import simulate_volume
    from us3d.phantom.varied import varied_setup

    setup = None if seed == 0 else varied_setup(np.random.default_rng(seed))
    phantom = simulate_volume(seed, setup)
    volume = torch.from_numpy(phantom.bmode[0].astype(np.float32))[None, None]
    spacing = (phantom.spacing[2], phantom.spacing[1], phantom.spacing[0])  # (k, j, i)
    assert depth_axis(volume, spacing) == 3
    swapped = volume.transpose(3, 4).contiguous()
    assert depth_axis(swapped, (spacing[0], spacing[2], spacing[1])) == 4


def test_a_layer_that_stays_while_the_tissue_below_moves():
    """The top 20 voxels along depth (j) stay, the rest moves 5 voxels along i; an estimate that moves
    everything (a guess that the layer follows) is corrected in the layer and kept below it."""
    moving = _texture((16, 96, 64), 4)
    truth = torch.zeros(1, 3, 16, 96, 64)
    truth[:, 2, :, 20:] = 5.0
    fixed = transform(moving, truth)
    guess = torch.zeros_like(truth)
    guess[:, 2] = 5.0
    found = with_layer_translations(fixed, moving, guess, (0.8, 0.3, 0.4), axis=3)

    def error(field, rows):
        return float((field - truth)[:, :, 2:-2, rows, 8:-8].pow(2).sum(1).sqrt().mean())

    layer, below = slice(2, 16), slice(26, 90)
    assert error(guess, layer) == pytest.approx(5.0)
    assert error(found, layer) < 1.0
    assert error(found, below) < 0.2
    assert not torch.equal(found, guess) and torch.equal(guess[:, 2], torch.full_like(guess[:, 2], 5.0))


@pytest.mark.parametrize("guess_shift", [5.0, 0.0])
def test_the_rows_next_to_a_sliding_interface_take_their_own_layer_s_shift(guess_shift):
    """Rows 0-43 along depth (j) stay, the rest move 5 voxels along i; the estimate says that everything
    moves, or that nothing does. A slab centred on a band next to the interface holds both layers and
    measures a mixture (about 1.1-1.5 voxels of error within 10 rows of the interface); one that reaches
    away from the interface holds one layer."""
    moving = _texture((16, 96, 64), 8)
    truth = torch.zeros(1, 3, 16, 96, 64)
    truth[:, 2, :, 44:] = 5.0
    fixed = transform(moving, truth)
    guess = torch.zeros_like(truth)
    guess[:, 2] = guess_shift
    found = with_layer_translations(fixed, moving, guess, (0.8, 0.3, 0.4), axis=3)
    error = (found - truth)[:, :, 2:-2, :, 8:-8].pow(2).sum(1).sqrt()
    assert float(error[:, :, 34:54].mean()) < 0.6
    assert float(error[:, :, 2:30].mean()) < 0.1 and float(error[:, :, 60:94].mean()) < 0.1


@pytest.mark.parametrize("estimated_interface", [38, 50])
def test_an_interface_estimated_too_shallow_or_too_deep_moves_to_where_the_speckle_says(estimated_interface):
    """Rows 0-43 along depth (j) stay, the rest move 5 voxels along i; the estimate is right in each layer
    but puts the interface 6 rows (1.8 mm) too shallow or too deep. Each wrong row takes the shift of a
    row a few voxels on, in its own layer; rows far from the interface keep the estimate."""
    moving = _texture((16, 96, 64), 8)
    truth = torch.zeros(1, 3, 16, 96, 64)
    truth[:, 2, :, 44:] = 5.0
    fixed = transform(moving, truth)
    guess = torch.zeros_like(truth)
    guess[:, 2, :, estimated_interface:] = 5.0
    found = with_depth_neighbours(fixed, moving, guess, (0.8, 0.3, 0.4), axis=3)
    wrong = slice(min(estimated_interface, 44), max(estimated_interface, 44))

    def error(field, rows):
        return float((field - truth)[:, :, 2:-2, rows, 8:-8].pow(2).sum(1).sqrt().mean())

    assert error(guess, wrong) == pytest.approx(5.0)
    assert error(found, wrong) < 0.5
    assert torch.equal(found[:, :, :, :30], guess[:, :, :, :30]) and torch.equal(found[:, :, :, 60:], guess[:, :, :, 60:])


def test_the_data_mask_fills_dark_speckle_and_leaves_out_the_sector_edge():
    volume = torch.full((1, 1, 4, 20, 30), 5.0)
    volume[..., :10] = 0.0  # outside the sector
    volume[..., 10, 20] = 0.0  # a dark voxel of speckle inside
    mask = data_mask(volume)
    assert mask[..., :11].sum() == 0  # the empty region and the first voxel of data next to it
    assert bool((mask[..., 11:] == 1).all())  # the dark voxel is data


def test_band_translations_ignore_the_static_edge_of_a_sector():
    """Tissue moves 6 voxels along i inside a region whose border (a sector's edge) does not move: a
    correlation that counts the empty region would pick the still edge."""
    moving = _texture((16, 64, 96), 5) + 4.0
    truth = torch.zeros(1, 3, 16, 64, 96)
    truth[:, 2] = 6.0
    fixed = transform(moving, truth)
    edge = torch.zeros_like(fixed, dtype=torch.bool)
    edge[..., :, :25] = True  # odd: the half-resolution blocks at the edge are half empty
    edge[..., :, 71:] = True
    fixed, moving = fixed.masked_fill(edge, 0.0), moving.masked_fill(edge, 0.0)
    shifts, bands = band_translations(fixed, moving, 3, (0.8, 0.3, 0.4))
    assert bands[0][0] == 0 and bands[-1][1] == 64
    assert shifts.shape == (len(SLAB_PLACEMENTS), 3, 16, 64, 96)
    for shift in shifts:  # every slab placement
        assert torch.allclose(shift[:, 0, 0, 30], torch.tensor([0.0, 0.0, 6.0]), atol=0.5)
        assert torch.allclose(shift.mean(dim=(1, 2, 3)), torch.tensor([0.0, 0.0, 6.0]), atol=0.5)


def test_an_estimate_that_matches_better_than_any_band_is_kept():
    """A smooth deformation that no band's translation matches as well as the true field: the true
    field comes back unchanged."""
    moving = _texture((16, 96, 64), 6)
    k, j, i = torch.meshgrid(torch.arange(16.0), torch.arange(96.0), torch.arange(64.0), indexing="ij")
    truth = torch.stack([torch.zeros_like(k), 2.0 * torch.sin(i / 10.0), 3.0 * torch.cos(j / 15.0)])[None]
    fixed = transform(moving, truth)
    found = with_layer_translations(fixed, moving, truth, (0.8, 0.3, 0.4), axis=3)
    assert float((found - truth).abs().max()) < 0.05


def test_a_patch_corrected_across_the_lateral_axis_does_not_fold():
    """The tissue moves 14 voxels along i; the estimate is right except in a lateral patch where it says
    0 (with a 14-voxel jump at each side of the patch). The patch takes the band's shift, and the
    refinement that follows leaves no fold."""
    from us3d.registration.refine import jacobian_determinant, refine

    moving = _texture((16, 64, 96), 7)
    truth = torch.zeros(1, 3, 16, 64, 96)
    truth[:, 2] = 14.0
    fixed = transform(moving, truth)
    guess = truth.clone()
    guess[:, 2, :, :, 36:60] = 0.0
    found = with_layer_translations(fixed, moving, guess, (0.8, 0.3, 0.4), axis=3)
    assert float((found - truth)[:, :, 2:-2, 4:-4, 44:52].abs().max()) < 1.0  # the patch's middle, corrected
    with torch.enable_grad():
        refined = refine(fixed, moving, found, (0.8, 0.3, 0.4)).detach()
    assert float((refined - truth)[:, :, 2:-2, 4:-4, 44:52].abs().max()) < 1.0
    assert float((jacobian_determinant(refined) <= 0).float().mean()) == 0.0
