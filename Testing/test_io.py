import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from us3d.errors import InputError
from us3d.io import (VolumeSequence, atomic_outputs, check_output_path, read_sequence, read_volume,
                     write_sequence, write_volume)


def _oblique_image(dtype=np.int16):
    array = (np.arange(4 * 5 * 6).reshape(4, 5, 6) * 3 - 20).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.3, 0.45, 1.7))
    image.SetOrigin((12.5, -3.0, 40.25))
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(tuple(rotation.ravel()))
    return image, array


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd"])
def test_volume_round_trip_keeps_data_and_geometry(tmp_path, suffix):
    image, array = _oblique_image()
    path = tmp_path / f"volume{suffix}"
    write_volume(image, path)
    back = read_volume(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-5)


def test_sample_volume_geometry_is_read_with_its_direction(sample_dir):
    image = read_volume(sample_dir / "MouseLiverB.mha")
    assert image.GetSize() == (128, 512, 4)
    assert image.GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1)


def _sequence():
    frames = np.random.default_rng(0).integers(0, 255, (3, 4, 5, 6)).astype(np.uint8)
    direction = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1.0]])
    return VolumeSequence(frames, (0.3, 0.4, 0.8), (10.0, -5.0, 3.0), direction, ["0", "0.25", "0.5"])


def test_sequence_round_trip(tmp_path):
    sequence = _sequence()
    write_sequence(sequence, tmp_path / "s.seq.nrrd")
    back = read_sequence(tmp_path / "s.seq.nrrd")
    np.testing.assert_array_equal(back.frames, sequence.frames)
    np.testing.assert_allclose(back.spacing, sequence.spacing)
    np.testing.assert_allclose(back.origin, sequence.origin)
    np.testing.assert_allclose(back.direction, sequence.direction)
    assert back.index_values == sequence.index_values
    frame = back.frame_image(1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(frame), sequence.frames[1])
    np.testing.assert_allclose(frame.GetOrigin(), sequence.origin)


@pytest.mark.parametrize("dtype,encoding", [(np.uint8, "gzip"), (np.float32, "raw")])
def test_sequence_files_are_read_and_written_by_slicer_mrml(tmp_path, dtype, encoding):
    slicer = pytest.importorskip("slicer")
    sequence = _sequence()
    sequence.frames = (sequence.frames * (0.37 if dtype == np.float32 else 1)).astype(dtype)
    write_sequence(sequence, tmp_path / "ours.seq.nrrd")
    # integer frames compress well; float frames barely do, and gzip would cost more than despeckling
    assert nrrd.read_header(str(tmp_path / "ours.seq.nrrd"))["encoding"] == encoding
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSequenceNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeSequenceStorageNode")
    storage.SetFileName(str(tmp_path / "ours.seq.nrrd"))
    assert storage.ReadData(node)
    assert node.GetNumberOfDataNodes() == 3
    assert node.GetNthIndexValue(2) == "0.5"
    volume = node.GetNthDataNode(1)
    from vtk.util.numpy_support import vtk_to_numpy
    voxels = vtk_to_numpy(volume.GetImageData().GetPointData().GetScalars()).reshape(sequence.frames.shape[1:])
    np.testing.assert_array_equal(voxels, sequence.frames[1])
    # Slicer works in RAS: the LPS origin (10, -5, 3) is RAS (-10, 5, 3).
    np.testing.assert_allclose(volume.GetOrigin(), (-10.0, 5.0, 3.0), atol=1e-9)

    storage.SetFileName(str(tmp_path / "slicer.seq.nrrd"))
    assert storage.WriteData(node)
    back = read_sequence(tmp_path / "slicer.seq.nrrd")
    np.testing.assert_array_equal(back.frames, sequence.frames)
    np.testing.assert_allclose(back.origin, sequence.origin, atol=1e-9)
    np.testing.assert_allclose(back.direction, sequence.direction, atol=1e-9)
    assert back.index_values == sequence.index_values


def test_bad_volume_files_give_clear_errors(tmp_path):
    (tmp_path / "empty.nrrd").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_volume(tmp_path / "empty.nrrd")
    (tmp_path / "junk.nrrd").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="not a readable volume"):
        read_volume(tmp_path / "junk.nrrd")
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "missing.nrrd")
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="3D volume is needed"):
        read_volume(tmp_path / "flat.nrrd")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="RGB"):
        read_volume(tmp_path / "rgb.nrrd")
    nan = sitk.GetImageFromArray(np.full((3, 3, 3), np.nan, np.float32))
    sitk.WriteImage(nan, str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError, match="NaN"):
        read_volume(tmp_path / "nan.nrrd")


def test_output_may_not_be_the_input(tmp_path):
    path = tmp_path / "a.nrrd"
    path.write_bytes(b"x")
    with pytest.raises(InputError, match="same file"):
        check_output_path(tmp_path / "." / "a.nrrd", path)
    with pytest.raises(InputError, match="must end with"):
        check_output_path(tmp_path / "a.png", path)


def test_failed_write_leaves_nothing(tmp_path):
    targets = [tmp_path / "one.nrrd", tmp_path / "two.nrrd"]
    with pytest.raises(RuntimeError):
        with atomic_outputs(targets) as temporaries:
            write_volume(_oblique_image()[0], temporaries[0])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_sequence_index_type_is_kept_through_a_file(tmp_path):
    import pytest

    from us3d.errors import InputError
    from us3d.io import VolumeSequence, read_sequence, write_sequence

    frames = np.zeros((2, 2, 3, 4), np.uint8)
    assert VolumeSequence(frames, index_values=["0", "0.5"]).index_type == "numeric"
    text = VolumeSequence(frames, index_values=["1", "2"], index_type="text")  # numbers, as text
    write_sequence(text, tmp_path / "t.seq.nrrd")
    assert read_sequence(tmp_path / "t.seq.nrrd").index_type == "text"
    with pytest.raises(InputError, match="index type"):
        VolumeSequence(frames, index_values=["exhale", "inhale"], index_type="numeric")


def test_float_sequences_are_written_from_the_arrays_own_buffer(tmp_path):
    """Raw (float) sequences skip pynrrd's whole-array copy, and read back as pynrrd would write them."""
    from us3d.io import _write_raw_nrrd

    sequence = _sequence()
    sequence.frames = sequence.frames.astype(np.float32) * 0.37
    write_sequence(sequence, tmp_path / "ours.seq.nrrd")
    back = read_sequence(tmp_path / "ours.seq.nrrd")
    np.testing.assert_array_equal(back.frames, sequence.frames)
    assert back.index_values == sequence.index_values
    ours = nrrd.read_header(str(tmp_path / "ours.seq.nrrd"))
    nrrd.write(str(tmp_path / "pynrrd.seq.nrrd"), sequence.frames, dict(ours), index_order="C")
    theirs = nrrd.read_header(str(tmp_path / "pynrrd.seq.nrrd"))
    assert {k: str(v) for k, v in ours.items()} == {k: str(v) for k, v in theirs.items()}
    assert _write_raw_nrrd(tmp_path / "again.seq.nrrd", sequence.frames, dict(ours), {}), \
        "this pynrrd lacks the header writer: float sequences are copied whole again when written"


def test_a_sequence_streamed_frame_by_frame_is_the_file_written_whole(tmp_path):
    from us3d.io import SequenceWriter

    sequence = _sequence()
    whole = VolumeSequence(sequence.frames.astype(np.float32) * 0.37, sequence.spacing, sequence.origin,
                           sequence.direction, sequence.index_values)
    write_sequence(whole, tmp_path / "whole.seq.nrrd")
    with SequenceWriter(tmp_path / "streamed.seq.nrrd", sequence) as writer:  # the uint8 input's geometry
        for frame in whole.frames:
            writer.write(frame)
    back = read_sequence(tmp_path / "streamed.seq.nrrd")
    np.testing.assert_array_equal(back.frames, whole.frames)
    assert back.frames.dtype == np.float32 and back.index_values == sequence.index_values
    np.testing.assert_allclose(back.direction, sequence.direction)
    ours, theirs = (nrrd.read_header(str(tmp_path / name)) for name in ("streamed.seq.nrrd", "whole.seq.nrrd"))
    assert {k: str(v) for k, v in ours.items()} == {k: str(v) for k, v in theirs.items()}
    with pytest.raises(InputError):
        SequenceWriter(tmp_path / "bad.seq.nrrd", sequence).write(whole.frames[0, :2])
    with pytest.raises(InputError):  # one frame short: an error, and atomic_outputs leaves nothing
        with atomic_outputs([tmp_path / "short.seq.nrrd"]) as (temporary,):
            with SequenceWriter(temporary, sequence) as writer:
                writer.write(whole.frames[0])
    assert not (tmp_path / "short.seq.nrrd").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.seq.nrrd", "streamed.seq.nrrd", "whole.seq.nrrd"]


def test_integer_volumes_are_compressed_and_fields_written_as_float32(tmp_path):
    """Issue 15: zlib on float voxels saves a few percent for seconds per 4D frame, so only integer
    volumes are compressed; displacement fields are written in float32 and read back to 1e-6 mm."""
    from us3d.registration.fields import field_array, read_field, write_field

    zeros = sitk.Image(64, 64, 16, sitk.sitkUInt8)
    write_volume(zeros, tmp_path / "zeros.mha")
    assert (tmp_path / "zeros.mha").stat().st_size < 64 * 64 * 16 / 10
    rng = np.random.default_rng(0)
    field = sitk.GetImageFromArray(rng.normal(0.0, 5.0, (16, 24, 32, 3)), isVector=True)
    field.SetSpacing((0.3, 0.2, 0.6))
    write_field(field, tmp_path / "field.mha")
    back = read_field(tmp_path / "field.mha")
    assert back.GetPixelID() == sitk.sitkVectorFloat32 and back.GetSpacing() == field.GetSpacing()
    assert (tmp_path / "field.mha").stat().st_size >= 16 * 24 * 32 * 3 * 4  # raw float32: not compressed
    np.testing.assert_allclose(field_array(back), field_array(field), atol=1e-5)
