"""VoxelMorph building blocks: the spatial transformer agrees with ITK's warp, integration,
network shapes and the initial field, the loss terms."""

import numpy as np
import SimpleITK as sitk
import torch

from us3d.registration.fields import warp
from us3d.registration.synthetic import shifted_blobs
from us3d.registration.voxelmorph import (SpatialTransformer, VoxelMorph, displacement_to_field, integrate,
                                          registration_loss, smoothness)


def _tensor(image: sitk.Image) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(image))[None, None]


def test_spatial_transformer_matches_itk_warp_on_an_oblique_grid():
    moving = shifted_blobs((16, 32, 48))
    moving.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    k, j, i = np.meshgrid(*[np.arange(n) for n in (16, 32, 48)], indexing="ij")
    displacement = np.stack([0.3 * np.sin(i / 9.0), 1.5 + 0.5 * np.cos(k / 5.0), -2.0 + 0.02 * j]).astype(np.float32)
    ours = SpatialTransformer()(_tensor(moving), torch.from_numpy(displacement)[None])[0, 0].numpy()
    theirs = sitk.GetArrayFromImage(warp(moving, displacement_to_field(displacement, moving)))
    inner = (slice(2, -2), slice(4, -4), slice(4, -4))  # away from where ITK and torch treat edges differently
    np.testing.assert_allclose(ours[inner], theirs[inner], atol=1e-3 * float(theirs.max()))


def test_integration_of_a_constant_velocity_is_that_displacement():
    velocity = torch.zeros(1, 3, 8, 16, 16)
    velocity[:, 1] = 2.0
    displacement = integrate(velocity)
    np.testing.assert_allclose(displacement[:, :, 2:-2, 4:-4, 4:-4].numpy(), velocity[:, :, 2:-2, 4:-4, 4:-4].numpy(),
                               atol=1e-4)


def test_network_starts_near_identity_and_keeps_any_shape():
    torch.manual_seed(0)
    model = VoxelMorph()
    volume = torch.rand(1, 1, 13, 40, 50)  # not multiples of 8 x 16 x 16
    displacement = model(volume, volume)  # identical volumes: no pre-alignment shift, a near-zero network field
    assert displacement.shape == (1, 3, 13, 40, 50)
    assert displacement.abs().max() < 1e-2


def test_network_output_does_not_depend_on_the_intensity_scale():
    torch.manual_seed(0)
    model = VoxelMorph()
    with torch.no_grad():
        model.flow.weight.normal_(std=0.1)  # a field well above rounding
        fixed, moving = torch.rand(1, 1, 8, 32, 32), torch.rand(1, 1, 8, 32, 32)
        first = model(fixed, moving)
        second = model(3 * fixed + 40, 3 * moving + 40)
    assert first.abs().max() > 1e-2
    np.testing.assert_allclose(first.numpy(), second.numpy(), atol=1e-4)


def test_scripted_model_round_trip_and_field_geometry(tmp_path):
    from us3d.models.bundle import load_model, save_model
    from us3d.registration.voxelmorph import register_voxelmorph

    torch.manual_seed(1)
    model = VoxelMorph()
    with torch.no_grad():
        model.flow.bias.copy_(torch.tensor([0.0, 0.0, 0.25]))  # a constant velocity: 0.5 voxel in i at full size
    path = tmp_path / "vm.pt"
    save_model(model, path, {"task": "registration", "preprocessing": "none"})
    loaded = load_model(str(path))
    assert loaded.metadata["task"] == "registration"
    fixed = shifted_blobs((16, 32, 48))
    fixed.SetSpacing((0.5, 0.3, 0.8))
    fixed.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    field = sitk.GetArrayFromImage(register_voxelmorph(fixed, fixed, loaded.module, torch.device("cpu")))
    with torch.no_grad():
        expected_voxels = model(_tensor(fixed), _tensor(fixed))[0].numpy()  # (k, j, i) voxels
    # the image's i axis (0.5 mm) points to +y in LPS, its j axis (0.3 mm) to -x
    np.testing.assert_allclose(field[..., 1], 0.5 * expected_voxels[2], atol=1e-5)
    np.testing.assert_allclose(field[..., 0], -0.3 * expected_voxels[1], atol=1e-5)
    assert abs(np.median(field[..., 1]) - 0.25) < 0.05


def test_registrar_refuses_a_despeckling_model_and_unknown_methods():
    import pytest

    from us3d.errors import InputError
    from us3d.registration.pairs import registrar

    with pytest.raises(InputError, match="not a registration model"):
        registrar("voxelmorph", "none", "cpu", model="unet-obnlm")
    with pytest.raises(InputError, match="method must be one of"):
        registrar("bspline")


def test_loss_terms():
    constant = torch.ones(1, 3, 4, 8, 8)
    assert smoothness(constant) == 0
    ramp = torch.arange(8.0).expand(1, 3, 4, 8, 8)
    assert smoothness(ramp) > 0
    fixed = torch.rand(1, 1, 4, 8, 8)
    assert registration_loss(fixed, fixed, constant) == 0
    assert registration_loss(fixed, fixed + 1, constant) == 1


def test_translation_finds_a_known_shift():
    from us3d.registration.voxelmorph import translation

    volume = _tensor(shifted_blobs((16, 48, 64)))
    moved = torch.roll(volume, shifts=(2, -5, 9), dims=(2, 3, 4))  # moved(x) = volume(x - s)
    shift = translation(volume, moved)[0]  # moved(x + s') matches volume(x): s' = s
    np.testing.assert_allclose(shift.numpy(), [2, -5, 9], atol=0.25)


def test_bundled_voxelmorph_recovers_a_known_shift_of_a_phantom_volume():
    from us3d.phantom import simulate_volume
    from us3d.registration.fields import field_array
    from us3d.registration.pairs import register_pair

    bmode = simulate_volume(9150).bmode[0]
    fixed = sitk.GetImageFromArray(bmode[:, :, 10:-10].astype(np.float32))
    fixed.SetSpacing((0.4, 0.3, 0.8))
    moving = sitk.GetImageFromArray(bmode[:, :, 5:-15].astype(np.float32))  # fixed(x) = moving(x + 5 voxels in i)
    moving.SetSpacing((0.4, 0.3, 0.8))
    result = register_pair(fixed, moving, "voxelmorph", "none", "cpu")
    inner = field_array(result.field)[4:-4, 8:-8, 8:-8].reshape(-1, 3)
    np.testing.assert_allclose(np.median(inner, axis=0), [2.0, 0.0, 0.0], atol=0.3)
    assert result.mse_after < 0.5 * result.mse_before and result.folding < 1e-3
