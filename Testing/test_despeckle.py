import numpy as np
import pytest
import SimpleITK as sitk

from us3d.despeckling import Cancelled, FrameTimer, ObnlmSettings, despeckle
from us3d.io import VolumeSequence


def _sequence(frames=5):
    data = np.random.default_rng(0).integers(0, 255, (frames, 3, 16, 16)).astype(np.uint8)
    return VolumeSequence(data, (0.5, 0.5, 1.0), index_values=[str(i / 6) for i in range(frames)])


def test_sequence_in_sequence_out_with_progress():
    sequence = _sequence()
    before = sequence.frames.copy()
    calls = []
    timer = FrameTimer(lambda done, total: calls.append((done, total)))
    result = despeckle(sequence, ObnlmSettings(), "cpu", progress=timer)
    assert calls == [(i, 5) for i in range(0, 6)]  # 0: the filter is ready
    assert result.index_values == sequence.index_values
    assert result.frames.shape == sequence.frames.shape
    assert len(timer.seconds_per_frame) == 5 and min(timer.seconds_per_frame) > 0
    np.testing.assert_array_equal(sequence.frames, before)  # input unchanged


def test_frames_handed_on_as_they_are_made_equal_the_whole_output():
    import us3d

    sequence = _sequence(4)
    whole = despeckle(sequence, ObnlmSettings(), "cpu")
    handed = []
    assert despeckle(sequence, ObnlmSettings(), "cpu", on_frame=lambda t, frame: handed.append((t, frame))) is None
    assert [t for t, _ in handed] == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.stack([frame for _, frame in handed]), whole.frames)
    assert us3d.despeckle(sequence.frames, on_frame=lambda t, frame: None, device="cpu") is None
    with pytest.raises(us3d.errors.InputError):  # a single volume has no frames to hand on
        us3d.despeckle(sequence.frames[0], on_frame=lambda t, frame: None)


def test_cancel_after_frame_two_produces_nothing():
    done = []
    with pytest.raises(Cancelled):
        despeckle(_sequence(), ObnlmSettings(), "cpu", progress=lambda d, t: done.append(d),
                  cancel=lambda: len(done) >= 3)
    assert done == [0, 1, 2]


def test_volume_keeps_geometry():
    image = sitk.GetImageFromArray(np.random.default_rng(1).random((3, 12, 12)).astype(np.float32))
    image.SetSpacing((0.2, 0.3, 0.9))
    image.SetOrigin((1.0, 2.0, 3.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    out = despeckle(image, ObnlmSettings(mode="3d"), "cpu")
    assert out.GetSpacing() == image.GetSpacing() and out.GetOrigin() == image.GetOrigin()
    assert out.GetDirection() == image.GetDirection()
    assert out.GetPixelID() == sitk.sitkFloat32
