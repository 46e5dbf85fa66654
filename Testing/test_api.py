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
