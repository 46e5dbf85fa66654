import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from us3d.cli import main
from us3d.io import read_sequence, read_volume


def run(*args):
    """The us3d CLI's `main` in this process: exit code, stdout, stderr. A fresh interpreter costs about 2.5 s
    of imports a command on 2 cores, some 40 commands here; `run_console_script` keeps that path tested."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()  # --threads sets the process's threads
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as done:  # argparse's usage errors
            code = done.code if isinstance(done.code, int) else 1
        finally:
            torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def run_console_script(*args):
    """The us3d console script in a subprocess, as a user runs it: exit code, stdout, stderr."""
    result = subprocess.run([sys.executable, "-m", "us3d.cli", *map(str, args)], capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture()
def short_validation(monkeypatch):
    """The training commands validate on the first seed of each held-out set (`short_validation.py`)."""
    from short_validation import shorten

    shorten(monkeypatch.setattr)


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    assert main(["phantom", str(folder / "liver.seq.nrrd"), "--frames", "2", "--seed", "1",
                 "--truth-dir", str(folder)]) == 0
    return folder


def test_output_folders_are_created_as_the_readme_writes_them(tmp_path):
    """`--truth-dir truth/` from an empty folder (the README's command) creates the folder; a missing
    parent is refused before any work."""
    assert main(["phantom", str(tmp_path / "one.nrrd"), "--truth-dir", str(tmp_path / "truth") + "/"]) == 0
    assert (tmp_path / "truth" / "displacement_000.mha").is_file()
    code, _, err = run("phantom", tmp_path / "two.nrrd", "--truth-dir", tmp_path / "no" / "truth")
    assert code == 2 and "does not exist" in err and not (tmp_path / "two.nrrd").exists()


def test_phantom_writes_sequence_and_ground_truth(phantom_files):
    sequence = read_sequence(phantom_files / "liver.seq.nrrd")
    assert sequence.frames.shape == (2, 32, 128, 128) and sequence.frames.dtype == np.uint8
    assert sequence.spacing == pytest.approx((0.4, 0.3, 0.8))
    assert read_sequence(phantom_files / "labels.seq.nrrd").frames.shape == (2, 32, 128, 128)
    field = sitk.ReadImage(str(phantom_files / "displacement_001.mha"))
    assert field.GetNumberOfComponentsPerPixel() == 3
    sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))  # loads as a transform


def test_despeckle_sequence_and_metrics_json(phantom_files, tmp_path):
    before = (phantom_files / "liver.seq.nrrd").read_bytes()
    code, out, err = run("despeckle", phantom_files / "liver.seq.nrrd", tmp_path / "out.seq.nrrd")
    assert code == 0, err
    assert "frame 2/2" in err  # progress per frame
    assert (phantom_files / "liver.seq.nrrd").read_bytes() == before  # input untouched
    filtered = read_sequence(tmp_path / "out.seq.nrrd")
    original = read_sequence(phantom_files / "liver.seq.nrrd")
    assert filtered.frames.shape == original.frames.shape
    assert filtered.index_values == original.index_values
    assert filtered.frames.std() < original.frames.std()

    code, out, err = run("metrics", phantom_files / "liver.seq.nrrd", tmp_path / "out.seq.nrrd", "--json",
                         "--labels", phantom_files / "labels.seq.nrrd", "--region", 2, "--versus", 1,
                         "--reference", phantom_files / "echogenicity.seq.nrrd")
    assert code == 0, err
    report = json.loads(out)
    assert len(report["frames"]) == 2
    assert set(report["mean"]) == {"enl", "smpi", "smpi_grey_levels", "ssi", "cnr", "gcnr", "mse", "psnr", "ssim"}
    assert report["mean"]["ssi"] < 1.0


def test_despeckle_volume_keeps_geometry(sample_dir, tmp_path):
    code, _, err = run("despeckle", sample_dir / "MouseLiverB.mha", tmp_path / "out.nrrd", "--mode", "3d",
                       "--search-radius", 2)
    assert code == 0, err
    original, filtered = read_volume(sample_dir / "MouseLiverB.mha"), read_volume(tmp_path / "out.nrrd")
    assert filtered.GetSize() == original.GetSize()
    np.testing.assert_allclose(filtered.GetDirection(), original.GetDirection())
    np.testing.assert_allclose(filtered.GetSpacing(), original.GetSpacing())
    np.testing.assert_allclose(filtered.GetOrigin(), original.GetOrigin())


@pytest.mark.parametrize("make_input,extra,message", [
    (lambda d: d / "missing.nrrd", [], "no such file"),
    (lambda d: (d / "empty.nrrd").write_bytes(b"") or d / "empty.nrrd", [], "is empty"),
    (lambda d: (d / "junk.mha").write_text("junk") and d / "junk.mha", [], "not a readable volume"),
    (lambda d: sitk.WriteImage(sitk.Image(9, 9, sitk.sitkUInt8), str(d / "2d.nrrd")) or d / "2d.nrrd", [], "3D"),
    (lambda d: sitk.WriteImage(sitk.Image([5, 5, 5], sitk.sitkVectorUInt8, 3), str(d / "rgb.nrrd"))
     or d / "rgb.nrrd", [], "RGB"),
    (lambda d: sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 4, 4), np.inf, np.float32)), str(d / "inf.nrrd"))
     or d / "inf.nrrd", [], "NaN or infinite"),
    (lambda d: sitk.WriteImage(sitk.Image([5, 5, 5], sitk.sitkUInt8), str(d / "ok.nrrd")) or d / "ok.nrrd",
     ["--block-radius", "0"], "block-radius"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, make_input, extra, message):
    source = make_input(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run("despeckle", source, tmp_path / "out.nrrd", *extra)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_output_over_input_is_refused(sample_dir, tmp_path):
    target = tmp_path / "in.mha"
    target.write_bytes((sample_dir / "MouseLiverB.mha").read_bytes())
    code, _, err = run("despeckle", target, target)
    assert code == 2 and "same file" in err
    assert target.read_bytes() == (sample_dir / "MouseLiverB.mha").read_bytes()


def test_help_on_every_command(capsys):
    code, out, _ = run_console_script("--help")  # once through the installed entry point
    assert code == 0 and "usage: us3d" in out
    for command in ("despeckle", "metrics", "phantom", "demo", "models", "train-despeckle", "register",
                    "register-sequence", "train-register"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and f"usage: us3d {command}" in capsys.readouterr().out


def test_every_command_first_lets_malloc_reuse_freed_memory(monkeypatch, capsys):
    """Large frames' tensors come from malloc's heap instead of fresh page-faulting mappings."""
    import platform

    from us3d import cli
    from us3d.allocator import reuse_freed_memory

    libc, version = platform.libc_ver()
    applied = reuse_freed_memory()
    assert isinstance(applied, bool) and (applied or libc != "glibc" or tuple(map(int, version.split("."))) < (2, 36))
    calls = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: calls.append(True))
    assert main(["models"]) == 0 and calls == [True]
    capsys.readouterr()


def test_demo_writes_report_views_and_volumes(tmp_path):
    assert main(["demo", str(tmp_path / "demo"), "--frames", "2"]) == 0
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| liver phantom, frame 1 | unet-sim |" in report and "| spine phantom (real, inside sweep) | unet-obnlm |" in report
    for name, panels in (("liver_frame0", 4), ("spine", 3)):
        for view in ("axial-k", "plane-j", "plane-i"):
            png = tmp_path / "demo" / f"{name}-{view}.png"
            assert f"]({png.name})" in report
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
            assert image.ndim == 2 and image.shape[1] > panels * 100 and image.std() > 10
    for method in ("obnlm", "unet-obnlm", "unet-sim", "warped_voxelmorph"):
        assert read_sequence(tmp_path / "demo" / f"liver_{method}.seq.nrrd").frames.shape == (2, 32, 128, 128)
    assert "| U-Net (unet-obnlm) |" in report.split("## Registration")[1]
    for pre in ("none", "obnlm", "unet"):
        assert f"](registration_{pre}-axial-k.png)" in report


def test_despeckle_with_bundled_unet_and_bad_model(sample_dir, tmp_path):
    output = tmp_path / "mouse_unet.nrrd"
    code, out, err = run("despeckle", str(sample_dir / "MouseLiverB.mha"), str(output), "--method", "unet",
                         "--device", "cpu")
    assert code == 0 and "U-Net unet-obnlm" in out, err
    filtered = sitk.ReadImage(str(output))
    original = sitk.ReadImage(str(sample_dir / "MouseLiverB.mha"))
    assert filtered.GetSize() == original.GetSize() and filtered.GetDirection() == original.GetDirection()
    code, out, err = run("despeckle", str(sample_dir / "MouseLiverB.mha"), str(tmp_path / "x.nrrd"),
                         "--method", "unet", "--model", "unet-missing")
    assert code == 2 and "unknown model 'unet-missing'" in err and not (tmp_path / "x.nrrd").exists()
    code, out, _ = run("models")
    assert code == 0 and "unet-obnlm" in out and "unet-sim" in out and "CORRUPT" not in out


def test_train_despeckle_writes_a_loadable_model_card_and_log(tmp_path, short_validation):
    model = tmp_path / "tiny.pt"
    code, out, err = run("train-despeckle", str(model), "--standard", "1", "--varied", "1", "--steps", "2",
                         "--batch-size", "1", "--crop", "8", "32", "32", "--target", "clean")
    assert code == 0, err
    from us3d.models.bundle import load_model

    loaded = load_model(str(model))
    assert loaded.metadata["target"] == "clean" and loaded.metadata["training"]["steps"] == 2
    assert loaded.input_mapping == "standardise"
    card = model.with_suffix(".md").read_text()
    assert "| standard phantom seed 9000 frame 0 |" in card
    assert "| varied simulator, j and i swapped | 1 |" in card  # one varied validation seed
    assert len(model.with_suffix(".log.jsonl").read_text().splitlines()) == 1
    code, _, err = run("train-despeckle", str(tmp_path / "bad.pt"), "--crop", "8", "30", "32")
    assert code == 2 and "multiples of 16" in err


def test_train_despeckle_data_parallel_under_torchrun(tmp_path):
    model = tmp_path / "ddp.pt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = str(Path(__file__).with_name("short_validation.py"))  # the us3d CLI, one seed per held-out set
    done = subprocess.run(torchrun + [script, "train-despeckle", str(model), "--standard", "1", "--varied",
                                      "0", "--steps", "2", "--batch-size", "1", "--crop", "8", "32", "32",
                                      "--threads", "1", "--cache", str(tmp_path / "cache"), "--target", "clean"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from us3d.models.bundle import load_model

    assert load_model(str(model)).metadata["training"]["processes"] == 2


def test_register_writes_warped_volume_and_field(tmp_path):
    from us3d.registration.fields import field_array
    from us3d.registration.synthetic import shifted_blobs

    sitk.WriteImage(shifted_blobs(), str(tmp_path / "fixed.nrrd"))
    moving = shifted_blobs(shift_mm=(1.5, 0.6, 0.0))
    sitk.WriteImage(moving, str(tmp_path / "moving.nrrd"))
    code, out, err = run("register", str(tmp_path / "fixed.nrrd"), str(tmp_path / "moving.nrrd"),
                         str(tmp_path / "warped.nrrd"), "--field", str(tmp_path / "field.mha"), "--method", "demons")
    assert code == 0, err
    assert "MSE" in out and "folding 0.000%" in out and "resampled" not in out
    field = field_array(sitk.ReadImage(str(tmp_path / "field.mha")))
    np.testing.assert_allclose(np.median(field[4:-4, 8:-8, 8:-8].reshape(-1, 3), axis=0), [1.5, 0.6, 0.0], atol=0.3)
    warped = sitk.ReadImage(str(tmp_path / "warped.nrrd"))
    assert warped.GetSize() == moving.GetSize()
    # a moving volume on another grid is resampled onto the fixed grid, and the user is told
    coarse = sitk.Resample(moving, [28, 24, 16], sitk.Transform(), sitk.sitkLinear, (0, 0, 0), (0.8, 0.6, 0.8))
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nrrd"))
    code, out, err = run("register", str(tmp_path / "fixed.nrrd"), str(tmp_path / "coarse.nrrd"),
                         str(tmp_path / "warped2.nrrd"), "--method", "demons")
    assert code == 0 and "resampled onto the fixed grid" in out, err
    assert sitk.ReadImage(str(tmp_path / "warped2.nrrd")).GetSize() == shifted_blobs().GetSize()


def test_register_bad_input(tmp_path, sample_dir):
    flat = sitk.Image(32, 32, 1, sitk.sitkFloat32)
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))
    spine = str(sample_dir / "SpinePhantomFreehandReconstructed.mha")
    code, _, err = run_console_script("register", spine, str(tmp_path / "flat.nrrd"), str(tmp_path / "w.nrrd"))
    assert code == 2 and "error:" in err and not (tmp_path / "w.nrrd").exists()
    code, _, err = run("register", spine, spine, str(tmp_path / "w.nrrd"), "--field", str(tmp_path / "w.nrrd"))
    assert code == 2 and "another file" in err


def test_register_sequence_with_the_bundled_voxelmorph_against_the_truth(phantom_files, tmp_path):
    import csv

    from us3d.registration.fields import field_array

    out_dir = tmp_path / "registered"
    code, out, err = run("register-sequence", phantom_files / "liver.seq.nrrd", out_dir, "--truth-dir", phantom_files)
    assert code == 0, err
    rows = list(csv.DictReader(open(out_dir / "metrics.csv")))
    assert [row["frame"] for row in rows] == ["0", "1"]
    # frame 0 onto itself: nothing moves; frame 1: MSE drops and the error is well under the motion
    truth = field_array(sitk.ReadImage(str(phantom_files / "displacement_001.mha")))
    motion = float(np.linalg.norm(truth, axis=-1).mean())
    assert float(rows[0]["endpoint_error_mean_mm"]) < 0.2
    assert float(rows[1]["mse_after"]) < float(rows[1]["mse_before"])
    assert float(rows[1]["endpoint_error_mean_mm"]) < 0.5 * motion
    assert float(rows[1]["folding_percent"]) < 0.1
    warped = read_sequence(out_dir / "warped.seq.nrrd")
    assert warped.frames.shape == (2, 32, 128, 128) and warped.spacing == pytest.approx((0.4, 0.3, 0.8))
    field = sitk.ReadImage(str(out_dir / "displacement_001.mha"))
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetSpacing() == pytest.approx((0.4, 0.3, 0.8))
    assert "mean endpoint error" in out


def test_register_sequence_refine_steps_and_methods_against_the_truth(phantom_files, tmp_path):
    """--refine-steps 0 is the network alone; the default refines it; --method translation refines the FFT
    translation without the network; each is scored against the phantom's true fields."""
    import csv

    errors = {}
    for name, options in (("network", ("--refine-steps", "0")), ("default", ()),
                          ("translation", ("--method", "translation")),
                          ("rigid", ("--method", "translation", "--refine-steps", "0"))):
        code, out, err = run("register-sequence", phantom_files / "liver.seq.nrrd", tmp_path / name, "--truth-dir",
                             phantom_files, "--device", "cpu", *options)
        assert code == 0, err
        rows = list(csv.DictReader(open(tmp_path / name / "metrics.csv")))
        errors[name] = float(rows[1]["endpoint_error_mean_mm"])
    assert errors["default"] < errors["network"] < errors["rigid"]
    assert errors["translation"] < errors["rigid"]


def test_register_sequence_bad_input(phantom_files, tmp_path, sample_dir):
    sequence = phantom_files / "liver.seq.nrrd"
    for args, message in [((sequence, tmp_path / "a", "--moving-frame", "5"), "between 0 and 1"),
                          ((sequence, tmp_path / "b", "--moving-frame", "1", "--truth-dir", phantom_files),
                           "--moving-frame 0"),
                          ((sequence, tmp_path / "c", "--truth-dir", tmp_path), "not found"),
                          ((sample_dir / "MouseLiverB.mha", tmp_path / "d"), "error:")]:
        code, _, err = run("register-sequence", *args)
        assert code == 2 and message in err, err
        assert not args[1].exists()  # no output folder either
    code, _, err = run("register", sample_dir / "MouseLiverB.mha", sample_dir / "MouseLiverB.mha",
                       tmp_path / "w.nrrd", "--registration-model", "unet-obnlm")
    assert code == 2 and "not a registration model" in err and not (tmp_path / "w.nrrd").exists()
    code, _, err = run("register", sample_dir / "MouseLiverB.mha", sample_dir / "MouseLiverB.mha",
                       tmp_path / "w.nrrd", "--refine-steps", "-1")
    assert code == 2 and "must be >= 0" in err and not (tmp_path / "w.nrrd").exists()


def test_train_register_writes_a_loadable_model_and_card(tmp_path, short_validation):
    from us3d.models.bundle import load_model

    model = tmp_path / "vm.pt"
    code, out, err = run("train-register", model, "--standard-sequences", "1", "--varied-sequences", "0", "--frames",
                         "2", "--steps", "2", "--threads", "2", "--cache", tmp_path / "cache", "--inputs", "none")
    assert code == 0, err
    loaded = load_model(str(model))
    assert loaded.metadata["task"] == "registration" and loaded.metadata["training"]["steps"] == 2
    assert loaded.metadata["preprocessing"] == ["none"]
    card = (tmp_path / "vm.md").read_text()
    assert "endpoint error" in card and "in 1 of these 1 sequences the wall slides" in card  # the standard wall slides
    assert len((tmp_path / "vm.log.jsonl").read_text().splitlines()) == 1
    for bad, message in ((["--initial-weights", "unet-obnlm"], "not a registration model"),
                         (["--random-motion", "1.5"], "between 0 and 1")):
        code, _, err = run("train-register", tmp_path / "bad.pt", "--standard-sequences", "1", "--varied-sequences",
                           "0", "--frames", "2", "--steps", "1", "--cache", tmp_path / "cache", "--inputs", "none", *bad)
        assert code == 2 and message in err and not (tmp_path / "bad.pt").exists()


def test_register_sequence_with_a_separate_moving_volume(phantom_files, tmp_path):
    import csv

    sequence = read_sequence(phantom_files / "liver.seq.nrrd")
    sitk.WriteImage(sequence.frame_image(0), str(tmp_path / "moving.nrrd"))
    code, out, err = run("register-sequence", phantom_files / "liver.seq.nrrd", tmp_path / "out", "--moving-volume",
                         tmp_path / "moving.nrrd", "--method", "translation", "--refine-steps", "0")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert len(rows) == 2 and rows[0]["resampled"] == "0" and "moving.nrrd registered to 2 frames" in out
    assert float(rows[0]["mse_after"]) < 1e-6  # frame 0 onto itself
    code, _, err = run("register-sequence", phantom_files / "liver.seq.nrrd", tmp_path / "out2", "--moving-volume",
                       tmp_path / "moving.nrrd", "--moving-frame", "1")
    assert code == 2 and "not both" in err and not (tmp_path / "out2").exists()


def test_despeckle_report(tmp_path, phantom_files):
    code, _, err = run("despeckle", phantom_files / "liver.seq.nrrd", tmp_path / "out.seq.nrrd", "--report",
                       tmp_path / "report.json", "--search-radius", "2")
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["device"] == "cpu" and len(report["seconds_per_frame"]) == 2 and report["warnings"] == []
    code, _, err = run("despeckle", phantom_files / "liver.seq.nrrd", tmp_path / "o.seq.nrrd", "--report",
                       tmp_path / "report.txt")
    assert code == 2 and ".json" in err and not (tmp_path / "o.seq.nrrd").exists()


def test_phantom_frame_is_that_frame_of_the_sequence(phantom_files, tmp_path):
    assert main(["phantom", str(tmp_path / "f1.nrrd"), "--seed", "1", "--frame", "1"]) == 0
    sequence = read_sequence(phantom_files / "liver.seq.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(tmp_path / "f1.nrrd")), sequence.frames[1])
    code, _, err = run("phantom", tmp_path / "f.seq.nrrd", "--frame", "1")
    assert code == 2 and "3D volume" in err
