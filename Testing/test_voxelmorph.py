"""VoxelMorph building blocks: the spatial transformer agrees with ITK's warp, integration,
network shapes and the initial field, the translation, the training loss terms."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from us3d.registration.fields import warp
from us3d.registration.synthetic import shifted_blobs
from us3d.registration.fields import displacement_to_field
from us3d.registration.voxelmorph import VoxelMorph, correlation, transform


def _tensor(image: sitk.Image) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(image))[None, None]


def test_spatial_transformer_matches_itk_warp_on_an_oblique_grid():
    moving = shifted_blobs((16, 32, 48))
    moving.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    k, j, i = np.meshgrid(*[np.arange(n) for n in (16, 32, 48)], indexing="ij")
    displacement = np.stack([0.3 * np.sin(i / 9.0), 1.5 + 0.5 * np.cos(k / 5.0), -2.0 + 0.02 * j]).astype(np.float32)
    ours = transform(_tensor(moving), torch.from_numpy(displacement)[None])[0, 0].numpy()
    theirs = sitk.GetArrayFromImage(warp(moving, displacement_to_field(displacement, moving)))
    inner = (slice(2, -2), slice(4, -4), slice(4, -4))  # away from where ITK and torch treat edges differently
    np.testing.assert_allclose(ours[inner], theirs[inner], atol=1e-3 * float(theirs.max()))


def test_correlation_peaks_at_the_true_offset():
    torch.manual_seed(0)
    moving = torch.randn(1, 4, 6, 12, 12)
    fixed = torch.roll(moving, shifts=(1, -2, 1), dims=(2, 3, 4))  # fixed(x) = moving(x - s): offset -s
    cost = correlation(fixed, moving, [1, 2, 2])  # (1, 3 * 5 * 5, ...), k-major offsets
    inner = cost[0, :, 2:-2, 3:-3, 3:-3].mean((1, 2, 3))
    k, j, i = np.unravel_index(int(inner.argmax()), (3, 5, 5))
    assert (k - 1, j - 2, i - 2) == (-1, 2, -1)
    # cosine similarity of feature vectors: within [-1, 1], 1 where fixed is moving moved by the offset
    assert float(cost.abs().max()) <= 1 + 1e-5
    assert torch.allclose(cost[0, 21, 2:-2, 3:-3, 3:-3], torch.ones(1), atol=1e-4)


def test_network_starts_near_identity_and_keeps_any_shape():
    torch.manual_seed(0)
    model = VoxelMorph()
    volume = torch.rand(1, 1, 13, 40, 50)  # not multiples of 8 x 16 x 16
    displacement = model(volume, volume)  # identical volumes: no pre-alignment shift, a near-zero network field
    assert displacement.shape == (1, 3, 13, 40, 50)
    # the output layer starts at weights of std 1e-3 on unit-scale inputs (cosine cost volumes, unit
    # features): a few hundredths of a voxel at most, against motions of several voxels
    assert displacement.abs().max() < 0.05


def test_network_output_does_not_depend_on_the_intensity_scale():
    torch.manual_seed(0)
    model = VoxelMorph()
    with torch.no_grad():
        for estimator in model.estimators:
            estimator.flow.weight.normal_(std=0.1)  # a field well above rounding
        fixed, moving = torch.rand(1, 1, 8, 32, 32), torch.rand(1, 1, 8, 32, 32)
        first = model(fixed, moving)
        second = model(3 * fixed + 40, 3 * moving + 40)
    assert first.abs().max() > 1e-2
    np.testing.assert_allclose(first.numpy(), second.numpy(), atol=1e-4)


def test_scripted_model_round_trip_and_field_geometry(tmp_path):
    from us3d.models.bundle import load_model, save_model
    from us3d.registration.pairs import Registrar, RegistrationSettings

    torch.manual_seed(1)
    model = VoxelMorph()
    with torch.no_grad():
        # a constant residual at the finest level (half in-plane resolution): 0.5 voxel in i at full size
        model.estimators[2].flow.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.25]))
    path = tmp_path / "vm.pt"
    save_model(model, path, {"task": "registration", "preprocessing": "none"})
    loaded = load_model(str(path))
    assert loaded.metadata["task"] == "registration"
    fixed = shifted_blobs((16, 32, 48))
    fixed.SetSpacing((0.5, 0.3, 0.8))
    fixed.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    registrar = Registrar(RegistrationSettings(model=str(path), refine_steps=0, device="cpu"))
    field_image = registrar.field(sitk.Cast(fixed, sitk.sitkFloat32), fixed)[0]
    assert field_image.GetPixelID() == sitk.sitkVectorFloat32  # what is computed and written
    field = sitk.GetArrayFromImage(field_image)
    with torch.no_grad():
        expected_voxels = model(_tensor(fixed), _tensor(fixed))[0].numpy()  # (k, j, i) voxels
    # the image's i axis (0.5 mm) points to +y in LPS, its j axis (0.3 mm) to -x
    np.testing.assert_allclose(field[..., 1], 0.5 * expected_voxels[2], atol=1e-5)
    np.testing.assert_allclose(field[..., 0], -0.3 * expected_voxels[1], atol=1e-5)
    assert abs(np.median(field[..., 1]) - 0.25) < 0.05


def test_training_loss_terms():
    from us3d.training.registration import EveryLevel, RegistrationTrainingSettings, smoothness_mm, training_loss

    spacing = torch.tensor([0.8, 0.3, 0.4]).view(1, 3, 1, 1, 1)
    constant = torch.ones(1, 3, 4, 8, 8)
    assert smoothness_mm(constant, spacing) == 0
    ramp = torch.arange(8.0).expand(1, 3, 4, 8, 8)  # every component grows 1 voxel per voxel along i (0.4 mm)
    per_component = [(0.8 / 0.4) ** 2, (0.3 / 0.4) ** 2, 1.0]  # (mm/mm)^2 of the k, j, i components
    assert float(smoothness_mm(ramp, spacing)) == pytest.approx(np.mean(per_component) / 3, rel=1e-5)
    torch.manual_seed(0)  # the initial weights: a fresh network's flow is small, not zero
    model = EveryLevel(VoxelMorph())  # starts at the FFT translation, which is 0 for identical volumes
    fixed = torch.rand(1, 1, 8, 32, 32)
    settings = RegistrationTrainingSettings()
    zero = training_loss(model, fixed, fixed, torch.zeros(1, 3, 8, 32, 32), spacing, settings)
    assert float(zero["endpoint"].detach()) == pytest.approx(0.1, abs=1e-3)  # Charbonnier floor sqrt(0.01)
    assert float(zero["mse"].detach()) < 1e-3  # a fresh network moves nothing (independent volumes: about 2)
    truth = torch.zeros(1, 3, 8, 32, 32)
    truth[:, 2] = 5.0  # 5 voxels of 0.4 mm along i: 2 mm
    moved = training_loss(model, fixed, fixed, truth, spacing, settings)
    assert float(moved["endpoint"].detach()) == pytest.approx((2.0 ** 2 + 0.01) ** 0.5, abs=0.01)


def test_training_batches_are_the_same_whatever_the_number_of_prefetch_threads():
    from us3d.training.registration import MotionSequence, RegistrationTrainingSettings, batch_stream

    rng = np.random.default_rng(1)
    sequences = [MotionSequence(f"s{n}", rng.integers(0, 255, (3, 4, 8, 8)).astype(np.uint8),
                                rng.normal(size=(3, 4, 8, 8, 3)).astype(np.float16), np.zeros((3, 4, 8, 8), np.uint8),
                                (0.3, 0.3, 0.8)) for n in range(2)]
    settings = RegistrationTrainingSettings(steps=7, batch_size=2, seed=3)
    one = list(batch_stream([sequences], settings, workers=1))
    three = list(batch_stream([sequences], settings, workers=3))
    assert len(one) == len(three) == 7
    for a, b in zip(one, three):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert not all(torch.equal(one[0][0], batch[0]) for batch in one[1:])  # each step draws its own pairs


def test_translation_finds_known_shifts_up_to_40_percent_of_the_field_of_view():
    from us3d.registration.voxelmorph import translation

    volume = _tensor(shifted_blobs((16, 48, 64), shift_mm=(0.0, 0.0, 0.0)))
    for shift_mm in ((3.6, -1.5, 0.8), (-10.0, 1.2, 0.0)):  # the second is 25 of 64 voxels along i
        moved = _tensor(shifted_blobs((16, 48, 64), shift_mm=shift_mm))  # moved(x) = volume(x - s)
        found = translation(volume, moved)[0].numpy()  # moved(x + s') matches volume(x): s' = s
        expected = np.array(shift_mm)[::-1] / np.array([0.8, 0.3, 0.4])  # (k, j, i) voxels
        np.testing.assert_allclose(found, expected, atol=0.5)


def test_translation_ignores_a_static_sector_mask_and_a_depth_trend():
    """Zero outside a fan and a brightness trend with depth do not move with the tissue: the shift is
    still the tissue's."""
    from us3d.registration.voxelmorph import translation

    j = torch.arange(48.0).view(1, 1, 1, 48, 1)
    i = torch.arange(64.0).view(1, 1, 1, 1, 64)
    fan = ((i - 32).abs() < 8 + 0.6 * j).float()
    trend = 200.0 * (1 - j / 48)
    for seed in range(3):  # with blocks that straddle the fan's edge in the mask, only seed 0 passed
        volume = _tensor(shifted_blobs((16, 48, 64), seed=seed))
        moved = _tensor(shifted_blobs((16, 48, 64), shift_mm=(-6.0, 0.0, 0.0), seed=seed))
        found = translation((volume + trend) * fan, (moved + trend) * fan)[0].numpy()
        np.testing.assert_allclose(found, [0.0, 0.0, -15.0], atol=1.5)  # 6 mm found within 0.6 mm, not 0


def test_translation_of_data_that_fill_a_quarter_of_the_grid():
    """A reconstructed sweep or a small sector in a large box: the overlap a shift needs is measured
    against the data, or no shift at all would be allowed (the shift found was 0)."""
    from us3d.registration.voxelmorph import translation

    window = torch.zeros((1, 1, 16, 48, 64))
    window[..., 12:36, 16:48] = 1.0  # 25% of the grid carries data
    volume = _tensor(shifted_blobs((16, 48, 64)))
    moved = _tensor(shifted_blobs((16, 48, 64), shift_mm=(-3.0, 0.0, 0.0)))  # 7.5 voxels along i
    found = translation((volume + 5.0) * window, (moved + 5.0) * window)[0].numpy()
    np.testing.assert_allclose(found, [0.0, 0.0, -7.5], atol=1.0)


def test_bundled_voxelmorph_recovers_a_known_shift_of_a_phantom_volume():
    from us3d.phantom import simulate_volume
    from us3d.registration.fields import field_array
    import us3d

    bmode = simulate_volume(9150).bmode[0]
    fixed = sitk.GetImageFromArray(bmode[:, :, 10:-10].astype(np.float32))
    fixed.SetSpacing((0.4, 0.3, 0.8))
    moving = sitk.GetImageFromArray(bmode[:, :, 5:-15].astype(np.float32))  # fixed(x) = moving(x + 5 voxels in i)
    moving.SetSpacing((0.4, 0.3, 0.8))
    result = us3d.register(fixed, moving, device="cpu")
    inner = field_array(result.field)[4:-4, 8:-8, 8:-8].reshape(-1, 3)
    np.testing.assert_allclose(np.median(inner, axis=0), [2.0, 0.0, 0.0], atol=0.3)
    assert result.mse_after < 0.5 * result.mse_before and result.folding < 1e-3


def test_the_translations_blur_is_a_gaussian_with_zeros_outside():
    """`_blur` (matrix products along each axis) equals three 1-D convolutions with zero padding."""
    import torch.nn.functional as F

    from us3d.registration.voxelmorph import _blur

    volume = torch.randn(2, 1, 6, 21, 13, generator=torch.Generator().manual_seed(5))
    sigma, radius = 1.5, 5
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    expected = F.conv3d(volume, taps.view(1, 1, -1, 1, 1), padding=[radius, 0, 0])
    expected = F.conv3d(expected, taps.view(1, 1, 1, -1, 1), padding=[0, radius, 0])
    expected = F.conv3d(expected, taps.view(1, 1, 1, 1, -1), padding=[0, 0, radius])
    assert torch.allclose(_blur(volume, sigma), expected, atol=1e-6)


def test_the_bundled_network_runs_with_compiled_cost_volumes_on_the_cpu():
    """On the CPU the registrar rebuilds the bundled TorchScript network as `VoxelMorph` with its
    weights (cost volumes in a compiled kernel): the same displacement; the caller's RNG is untouched;
    another module is kept as it is."""
    from us3d.models.bundle import load_model
    from us3d.registration.voxelmorph import for_inference

    scripted = load_model("voxelmorph").module
    state = torch.random.get_rng_state()
    rebuilt = for_inference(scripted)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(rebuilt, VoxelMorph) and not isinstance(rebuilt, torch.jit.ScriptModule)
    fixed = _tensor(shifted_blobs((16, 48, 64), shift_mm=(0.0, 0.0, 0.0)))
    moving = _tensor(shifted_blobs((16, 48, 64), shift_mm=(2.0, -1.0, 0.5)))
    with torch.inference_mode():
        np.testing.assert_allclose(rebuilt(fixed, moving).numpy(), scripted(fixed, moving).numpy(), atol=1e-4)
    other = torch.nn.Conv3d(1, 1, 1)
    assert for_inference(other) is other


def test_a_prepared_moving_volume_gives_the_same_displacement():
    """A moving volume registered to many frames has its translation spectra and features made once
    (`prepare_moving`), in the network and in the registrar's sequence loop: the same result."""
    from us3d.io import VolumeSequence
    from us3d.registration.pairs import Registrar, RegistrationSettings

    torch.manual_seed(2)
    network = VoxelMorph().eval()
    fixed = _tensor(shifted_blobs((12, 40, 36), shift_mm=(0.0, 0.0, 0.0)))
    moving = _tensor(shifted_blobs((12, 40, 36), shift_mm=(1.5, -0.6, 0.4)))
    with torch.inference_mode():
        assert torch.equal(network(fixed, moving, network.prepare_moving(moving)), network(fixed, moving))

    frames = [shifted_blobs((10, 40, 48), shift_mm=(0.5 * t, -0.3 * t, 0.0)) for t in range(3)]
    sequence = VolumeSequence.from_images([sitk.Cast(f, sitk.sitkUInt8) for f in frames])
    registrar = Registrar(RegistrationSettings(refine_steps=4, device="cpu"))
    results = registrar.register_sequence(sequence, 0)  # prepares frame 0 once
    for t in (1, 2):
        alone = registrar.register_pair(sequence.frame_image(t), sequence.frame_image(0))
        np.testing.assert_allclose(sitk.GetArrayFromImage(results[t].field), sitk.GetArrayFromImage(alone.field),
                                   atol=1e-5)
    prepared = registrar.prepare_moving(registrar.preprocess(sequence.frame_image(0)))
    with pytest.raises(ValueError):
        registrar.displacement(sequence.frame_image(1), sequence.frame_image(2), prepared=prepared)


def test_the_compiled_cost_volume_equals_torch():
    from us3d.registration.voxelmorph import correlation

    generator = torch.Generator().manual_seed(3)
    fixed, moving = torch.randn(2, 2, 8, 5, 7, 9, generator=generator)
    with torch.no_grad():
        compiled = correlation(fixed, moving, [1, 2, 3])
    reference = correlation(fixed.requires_grad_(True), moving, [1, 2, 3])  # autograd: the torch loop
    np.testing.assert_allclose(compiled.numpy(), reference.detach().numpy(), atol=1e-6)


def test_the_compiled_spatial_transformer_equals_grid_sample():
    """On the CPU without gradients `transform` runs a compiled kernel: grid_sample's values (border
    padding) for a volume and for channels-last features, with displacements that leave the grid;
    the result keeps the input's memory layout."""
    generator = torch.Generator().manual_seed(4)
    for channels, layout in ((1, torch.contiguous_format), (3, torch.contiguous_format),
                             (8, torch.channels_last_3d)):
        moving = torch.randn(2, channels, 6, 11, 13, generator=generator).contiguous(memory_format=layout)
        displacement = 8.0 * (torch.rand(2, 3, 6, 11, 13, generator=generator) - 0.5)
        with torch.no_grad():
            compiled = transform(moving, displacement)
        reference = transform(moving.clone().requires_grad_(True), displacement)  # autograd: grid_sample
        np.testing.assert_allclose(compiled.numpy(), reference.detach().numpy(), atol=1e-5)
        assert compiled.is_contiguous(memory_format=layout)


def test_translation_of_a_large_shift_under_a_static_pattern():
    """Smooth (blurred) textures correlate at any shift. A texture that moves by 39% of the field of view
    under a static pattern almost as strong (reverberation, shadows): the whole overlap at zero shift
    must not win over the true shift's smaller one."""
    from us3d.registration.separable import gaussian
    from us3d.registration.voxelmorph import normalised, translation

    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        texture = gaussian(torch.randn((1, 1, 16, 48, 104), generator=generator), 1.5, False)
        scale = texture.std()

        def pattern() -> torch.Tensor:
            smooth = gaussian(torch.randn((1, 1, 16, 48, 64), generator=generator), 1.5, False)
            return smooth * scale / smooth.std()

        static = 0.86 * pattern()
        fixed = texture[..., 40:104] + static + 0.5 * pattern()
        moving = texture[..., 15:79] + static + 0.5 * pattern()  # moving(x + 25 voxels along i) = fixed(x)
        shift = translation(normalised(fixed), normalised(moving))[0].numpy()
        np.testing.assert_allclose(shift, [0, 0, 25], atol=1.0)
