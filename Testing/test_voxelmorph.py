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


def test_network_starts_near_identity_and_keeps_the_shape():
    torch.manual_seed(0)
    model = VoxelMorph()
    fixed, moving = torch.rand(1, 1, 16, 32, 48), torch.rand(1, 1, 16, 32, 48)
    displacement = model(fixed, moving)
    assert displacement.shape == (1, 3, 16, 32, 48)
    assert displacement.abs().max() < 1e-2


def test_loss_terms():
    constant = torch.ones(1, 3, 4, 8, 8)
    assert smoothness(constant) == 0
    ramp = torch.arange(8.0).expand(1, 3, 4, 8, 8)
    assert smoothness(ramp) > 0
    fixed = torch.rand(1, 1, 4, 8, 8)
    assert registration_loss(fixed, fixed, constant) == 0
    assert registration_loss(fixed, fixed + 1, constant) == 1
