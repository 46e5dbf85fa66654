"""Training pairs with a random smooth motion (us3d.training.random_motion) and fine-tuning from a model."""

import numpy as np
import torch
import torch.nn.functional as F

from us3d.registration.refine import jacobian_determinant
from us3d.registration.voxelmorph import VoxelMorph, transform
from us3d.training.random_motion import random_field_mm, random_motion_pair

SPACING = np.array([0.8, 0.3, 0.4], np.float32)  # (k, j, i) mm


def _texture(shape=(16, 48, 48), seed=0) -> np.ndarray:
    """A speckle-like texture: the magnitude of smoothed complex noise, > 0 everywhere."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.normal(size=(1, 2, *shape))).float()
    smooth = F.avg_pool3d(noise, 3, stride=1, padding=1)
    return (smooth.pow(2).sum(1).sqrt()[0] + 0.05).numpy()


def _correlation(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return float(np.corrcoef(a[where], b[where])[0, 1])


def test_the_true_field_of_a_random_pair_warps_moving_onto_fixed():
    volume = _texture()
    hulls = 0
    for seed in range(8):
        fixed, moving, truth = random_motion_pair(volume, SPACING, np.random.default_rng(seed))
        assert fixed.shape == moving.shape == volume.shape and truth.shape == (3, *volume.shape)
        assert fixed.min() >= 0 and moving.min() >= 0
        hulls += bool((moving == 0).mean() > 0.05)
        warped = transform(torch.from_numpy(moving)[None, None], torch.from_numpy(truth)[None])[0, 0].numpy()
        data = torch.from_numpy((moving > 0).astype(np.float32))[None, None]
        inside = transform(data, torch.from_numpy(truth)[None])[0, 0].numpy() > 0.999  # not at a hull's edge
        both = (fixed > 0) & inside
        # the truth explains the pair up to the speckle decorrelation noise; no motion does not
        assert _correlation(fixed, warped, both) > 0.85
        assert _correlation(fixed, warped, both) > _correlation(fixed, moving, both) + 0.1
    assert 1 <= hulls <= 7  # half of the pairs are seen through a data hull


def test_random_fields_are_smooth_and_do_not_fold():
    shape = (32, 128, 128)
    locals_ = []
    for seed in range(40):
        voxels = (random_field_mm(shape, SPACING, np.random.default_rng(seed))
                  / torch.from_numpy(SPACING).view(3, 1, 1, 1)).numpy()
        assert float(jacobian_determinant(torch.from_numpy(voxels)[None]).min()) > 0
        mm = voxels * SPACING[:, None, None, None]
        locals_.append(float((mm - mm.mean(axis=(1, 2, 3), keepdims=True)).std()))
    assert max(locals_) > 0.5  # not only bulk shifts: the field deforms


def test_fine_tuning_starts_from_the_given_weights():
    from us3d.training.registration import MotionSequence, RegistrationTrainingSettings, train_registration

    rng = np.random.default_rng(2)
    sequences = [MotionSequence("s", rng.integers(1, 255, (2, 8, 16, 16)).astype(np.uint8),
                                np.zeros((2, 8, 16, 16, 3), np.float16), np.zeros((2, 8, 16, 16), np.uint8),
                                (0.4, 0.3, 0.8))]
    torch.manual_seed(7)
    start = VoxelMorph().state_dict()
    settings = RegistrationTrainingSettings(steps=1, batch_size=1, learning_rate=1e-6, random_motion=1.0)
    tuned = train_registration([sequences], settings, torch.device("cpu"), initial=start).state_dict()
    fresh = train_registration([sequences], settings, torch.device("cpu")).state_dict()
    # one Adam step moves a weight by about the learning rate
    assert max(float((tuned[k] - start[k]).abs().max()) for k in start) < 1e-5
    assert max(float((fresh[k] - start[k]).abs().max()) for k in start) > 1e-3
