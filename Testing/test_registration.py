"""Displacement fields (warping, Jacobian, endpoint error) and the classical demons registration."""

import numpy as np
import pytest
import SimpleITK as sitk

from us3d.errors import InputError
from us3d.registration.demons import register_demons
from us3d.registration.synthetic import shifted_blobs
from us3d.registration.fields import (displacement_to_field, endpoint_error, field_array, field_image,
                                      folding_fraction, jacobian_determinant, warp, warp_voxels)


def blobs(shape=(16, 48, 56), spacing=(0.4, 0.3, 0.8), shift_mm=(0.0, 0.0, 0.0)) -> sitk.Image:
    return shifted_blobs(shape, spacing, shift_mm)


def test_constant_field_warps_like_a_translation():
    fixed = blobs()
    field = field_image(np.broadcast_to([1.2, -0.6, 0.0], fixed.GetSize()[::-1] + (3,)), fixed)
    warped = sitk.GetArrayFromImage(warp(fixed, field))
    # moving(x + d): content moves by -d
    expected = sitk.GetArrayFromImage(blobs(shift_mm=(-1.2, 0.6, 0.0)))
    inner = (slice(None), slice(4, -4), slice(5, -5))
    np.testing.assert_allclose(warped[inner], expected[inner], atol=2.0)
    np.testing.assert_allclose(jacobian_determinant(field), 1.0, atol=1e-9)
    assert folding_fraction(field) == 0.0


def test_warp_uses_the_moving_geometry():
    fixed = blobs()
    moving = blobs()
    moving.SetOrigin((2.0, 0.0, 0.0))  # same pattern, 2 mm further along x
    identity = field_image(np.zeros(fixed.GetSize()[::-1] + (3,)), fixed)
    warped = sitk.GetArrayFromImage(warp(moving, identity))
    expected = sitk.GetArrayFromImage(blobs(shift_mm=(2.0, 0.0, 0.0)))
    np.testing.assert_allclose(warped[:, :, 8:], expected[:, :, 8:], atol=2.0)


@pytest.mark.parametrize("extrapolate", [False, True])
def test_compiled_warp_by_voxels_equals_itk(extrapolate):
    # a rotated, offset grid and displacements of several voxels, many of them out of the volume
    rng = np.random.default_rng(3)
    moving = sitk.GetImageFromArray(rng.random((9, 13, 11)).astype(np.float32))
    moving.SetSpacing((0.3, 0.2, 0.7))
    moving.SetOrigin((1.0, 2.0, 3.0))
    moving.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    displacement = (rng.standard_normal((3, 9, 13, 11)) * 3).astype(np.float32)
    expected = warp(moving, displacement_to_field(displacement, moving), extrapolate=extrapolate)
    got = warp_voxels(moving, displacement, extrapolate)
    np.testing.assert_allclose(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(expected), atol=1e-6)
    assert got.GetOrigin() == moving.GetOrigin() and got.GetDirection() == moving.GetDirection()
    with pytest.raises(InputError):
        warp_voxels(moving, displacement[:, :-1])


def test_intensity_mse_is_the_papers_mse_on_intensities_scaled_by_the_fixed_range():
    from us3d.metrics import mse
    from us3d.registration.pairs import intensity_mse

    rng = np.random.default_rng(5)
    fixed = sitk.GetImageFromArray((rng.random((6, 10, 12)) * 200 + 20).astype(np.float32))
    moving = sitk.GetImageFromArray((rng.random((6, 10, 12)) * 90 + 5).astype(np.float32))
    f, m = sitk.GetArrayFromImage(fixed).astype(np.float64), sitk.GetArrayFromImage(moving).astype(np.float64)
    low, high = f.min(), f.max()
    zero = np.zeros((3, 6, 10, 12), np.float32)
    before, after = intensity_mse(fixed, moving, displacement_to_field(zero, fixed), zero)
    assert before == pytest.approx(mse((m - low) / (high - low), (f - low) / (high - low)), rel=1e-12)
    assert after == pytest.approx(before, rel=1e-6)  # a zero field warps nothing


def test_folding_and_endpoint_error():
    fixed = blobs((8, 16, 16))
    displacement = np.zeros((8, 16, 16, 3))
    displacement[:, :, 8:, 0] = -5.0  # x jumps back by 5 mm at i = 8: the mapping folds there
    field = field_image(displacement, fixed)
    assert 0 < folding_fraction(field) < 0.5
    mean, p95 = endpoint_error(field, field_image(np.zeros_like(displacement), fixed))
    assert mean == pytest.approx(2.5) and p95 == pytest.approx(5.0)
    with pytest.raises(InputError):
        endpoint_error(field, field_image(np.zeros((8, 16, 15, 3)), blobs((8, 16, 15))))


def test_field_round_trips_through_a_file(tmp_path):
    fixed = blobs((8, 16, 16))
    fixed.SetOrigin((1.0, 2.0, 3.0))
    displacement = np.random.default_rng(1).normal(size=(8, 16, 16, 3))
    path = tmp_path / "field.mha"
    sitk.WriteImage(field_image(displacement, fixed), str(path))
    back = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(field_array(back), displacement)
    assert back.GetOrigin() == (1.0, 2.0, 3.0)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(back, sitk.sitkVectorFloat64))
    point = back.TransformIndexToPhysicalPoint((3, 4, 5))
    np.testing.assert_allclose(np.subtract(transform.TransformPoint(point), point), displacement[5, 4, 3])


def test_demons_recovers_a_known_shift():
    fixed = blobs()
    moving = blobs(shift_mm=(1.5, 0.6, 0.0))
    field = register_demons(fixed, moving)
    inner = field_array(field)[4:-4, 8:-8, 8:-8]
    np.testing.assert_allclose(np.median(inner.reshape(-1, 3), axis=0), [1.5, 0.6, 0.0], atol=0.3)
    assert folding_fraction(field) == 0.0


def test_large_motion_lowers_the_mse_instead_of_raising_it():
    """Voxels mapped from outside the moving volume must not count as black: a 5 mm shift, recovered by
    the translation, has to lower the MSE (it rose with a zero fill)."""
    from us3d.phantom import simulate_sequence
    from us3d.registration.pairs import Registrar, RegistrationSettings

    phantom = simulate_sequence(1, seed=9154)
    moving = sitk.GetImageFromArray(phantom.bmode[0].astype(np.float32))
    moving.SetSpacing(phantom.spacing)
    shift = sitk.TranslationTransform(3, (5.0, 0.0, 0.0))
    fixed = sitk.Resample(moving, moving, shift, sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
    result = Registrar(RegistrationSettings(method="translation", refine_steps=0, device="cpu")).register_pair(
        fixed, moving)
    assert result.mse_after < 0.5 * result.mse_before
    # the warped volume itself keeps the usual zero outside the moving volume
    assert sitk.GetArrayViewFromImage(result.warped)[:, :, -5:].max() == 0


def test_sequence_frames_stream_one_at_a_time():
    """Issue 15: with `on_frame`, each frame's result is handed out as soon as it is made and only its
    figures are kept, so a long 4D sequence never holds every field at once; bad input is refused
    before any frame is registered."""
    import us3d
    from us3d.io import VolumeSequence

    frames = np.stack([sitk.GetArrayFromImage(shifted_blobs(shift_mm=(0.4 * t, 0.0, 0.0))) for t in range(3)])
    sequence = VolumeSequence(frames.astype(np.float32), (0.4, 0.3, 0.8))
    registrar = us3d.Registrar(us3d.RegistrationSettings(method="translation", refine_steps=0, device="cpu"))
    made, handed, progress = [], [], []
    original = registrar.field
    registrar.field = lambda *args, **kwargs: made.append(1) or original(*args, **kwargs)
    with pytest.raises(InputError):
        registrar.register_sequence(sequence, moving=5)
    assert made == []

    def on_frame(t, result):
        assert len(made) == t + 1 and result.field is not None and result.warped is not None
        handed.append(t)

    results = registrar.register_sequence(sequence, on_frame=on_frame, progress=lambda d, n: progress.append(d))
    assert handed == [0, 1, 2] and progress == [0, 1, 2, 3]
    assert all(r.field is None and r.warped is None for r in results)
    assert results[-1].mse_after < results[-1].mse_before
    kept = us3d.register_sequence(sequence, method="translation", refine_steps=0, device="cpu")
    assert [r.mse_after for r in kept] == [r.mse_after for r in results] and kept[-1].field is not None


def test_volumes_sampled_finer_than_the_training_data_are_registered_on_a_coarser_grid():
    """Axes finer than the network's training data are averaged down for registering; the field comes
    back on the input grid and still recovers the motion, and volumes within the training range keep
    their grid."""
    from us3d.registration.pairs import Registrar, RegistrationSettings, working_size

    assert working_size([32, 128, 128], (0.8, 0.3, 0.4)) == [32, 128, 128]
    assert working_size([128, 256, 256], (0.3, 0.2, 0.3)) == [64, 256, 256]
    assert working_size([9, 40, 40], (0.1, 0.1, 0.4)) == [2, 20, 40]
    fixed = blobs((24, 48, 56), (0.4, 0.3, 0.3))  # 0.3 mm between slices: 12 are used
    moving = blobs((24, 48, 56), (0.4, 0.3, 0.3), (0.0, 0.9, 0.6))
    result = Registrar(RegistrationSettings(method="translation", refine_steps=8, device="cpu")).register_pair(
        fixed, moving)
    assert result.field.GetSize() == fixed.GetSize() and result.field.GetSpacing() == fixed.GetSpacing()
    inner = field_array(result.field)[6:-6, 10:-10, 10:-10]
    np.testing.assert_allclose(np.median(inner.reshape(-1, 3), axis=0), [0.0, 0.9, 0.6], atol=0.15)
