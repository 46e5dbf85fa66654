"""The public Python API: the README's example runs as written, and the functions take and return
what their docstrings say."""

import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import us3d

ROOT = Path(__file__).resolve().parent.parent


def _phantom_files(folder: Path) -> None:
    from us3d.phantom import simulate_sequence

    phantom = simulate_sequence(3, seed=9151)
    for name, t in (("fixed.nrrd", 2), ("moving.nrrd", 0)):
        image = sitk.GetImageFromArray(phantom.bmode[t])
        image.SetSpacing(phantom.spacing)
        sitk.WriteImage(image, str(folder / name))


def test_readme_python_example_runs_as_written(tmp_path, capsys):
    text = (ROOT / "README.md").read_text()
    example = re.search(r"## Python\n\n```python\n(.*?)```", text, re.S).group(1)
    _phantom_files(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(example, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    before, after = (float(v) for v in capsys.readouterr().out.split())
    assert after < before
    assert sitk.ReadImage(str(tmp_path / "moving_unet.nrrd")).GetSize() == (128, 128, 32)
    field = sitk.ReadImage(str(tmp_path / "field.mha"))
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetSize() == (128, 128, 32)


def test_register_sequence_returns_one_result_per_frame_against_the_truth():
    from us3d.io import VolumeSequence
    from us3d.phantom import simulate_sequence
    from us3d.phantom.export import displacement_image

    phantom = simulate_sequence(3, seed=9152)
    sequence = VolumeSequence(phantom.bmode, phantom.spacing)
    truths = [displacement_image(phantom, t) for t in range(3)]
    results = us3d.register_sequence(sequence, 0, device="cpu", truths=truths, refine_steps=8)
    assert len(results) == 3
    motion = np.linalg.norm(phantom.displacement[2], axis=-1).mean()
    assert results[0].endpoint_error[0] < 0.2 and results[2].endpoint_error[0] < 0.25 * motion
    assert all(r.warped.GetSize() == (128, 128, 32) for r in results)


def test_despeckle_returns_the_kind_it_was_given():
    from us3d.io import VolumeSequence

    rng = np.random.default_rng(3)
    volume = rng.rayleigh(40.0, (4, 32, 48)).astype(np.float32)
    keep = volume.copy()
    smooth = us3d.despeckle(volume)
    assert isinstance(smooth, np.ndarray) and smooth.shape == volume.shape and smooth.dtype == np.float32
    assert smooth.std() < volume.std() and np.array_equal(volume, keep)  # smoothed; input untouched
    frames = us3d.despeckle(np.stack([volume, volume[:, ::-1]]), search_radius=2)
    assert frames.shape == (2, 4, 32, 48)
    np.testing.assert_allclose(frames[0], us3d.despeckle(volume, search_radius=2), atol=1e-5)

    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.3, 0.4, 0.9))
    image.SetOrigin((1.0, 2.0, 3.0))
    out = us3d.despeckle(image, "unet", model="unet-obnlm", device="cpu")
    assert isinstance(out, sitk.Image) and out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin() and out.GetSize() == image.GetSize()

    sequence = VolumeSequence(np.stack([volume, volume]), (0.3, 0.4, 0.9), index_values=["0", "0.25"])
    out = us3d.despeckle(sequence, mode="3d")
    assert isinstance(out, VolumeSequence) and out.index_values == ["0", "0.25"] and out.frames.shape[0] == 2


def test_despeckle_refuses_settings_of_the_other_method():
    import pytest

    from us3d.errors import InputError

    volume = np.ones((2, 16, 16), np.float32)
    with pytest.raises(InputError, match="apply to method='obnlm'"):
        us3d.despeckle(volume, "unet", search_radius=5)
    with pytest.raises(InputError, match="method='unet'"):
        us3d.despeckle(volume, model="unet-sim")
    with pytest.raises(InputError, match="method must be one of"):
        us3d.despeckle(volume, "median")
    with pytest.raises(InputError, match="2-dimensional"):
        us3d.despeckle(volume[0])


def test_read_write_simulate_and_metrics(tmp_path):
    import pytest

    from us3d.errors import InputError

    phantom = us3d.simulate(2, seed=9153)
    assert phantom.bmode.shape == (2, 32, 128, 128) and phantom.displacement.shape == (2, 32, 128, 128, 3)
    sequence = phantom.to_sequence()
    us3d.write(sequence, tmp_path / "liver.seq.nrrd")
    back = us3d.read(tmp_path / "liver.seq.nrrd")
    assert np.array_equal(back.frames, phantom.bmode) and back.spacing == pytest.approx(phantom.spacing)
    with pytest.raises(InputError, match="exists"):
        us3d.write(sequence, tmp_path / "liver.seq.nrrd")
    with pytest.raises(InputError, match=".seq.nrrd"):
        us3d.write(sequence, tmp_path / "liver.nrrd")
    us3d.write(sequence.frame_image(1), tmp_path / "frame.nrrd")
    assert us3d.read(tmp_path / "frame.nrrd").GetSize() == (128, 128, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame.nrrd", "liver.seq.nrrd"]  # no temporaries left
    # a displacement field goes out in float32, as the CLI writes it
    from us3d.registration.fields import field_array, field_image, read_field

    field = field_image(phantom.displacement[1], sequence.frame_image(1))
    us3d.write(field, tmp_path / "field.mha")
    back = read_field(tmp_path / "field.mha")
    assert back.GetPixelID() == sitk.sitkVectorFloat32 and back.GetOrigin() == field.GetOrigin()
    np.testing.assert_allclose(field_array(back), phantom.displacement[1], atol=1e-5)
    smooth = us3d.despeckle(phantom.bmode[0].astype(np.float32))
    assert us3d.metrics.smpi(phantom.bmode[0], smooth) < 1
