"""The benchmark code path runs end to end on tiny inputs, so `make bench` cannot rot unnoticed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_run_all_tiny_writes_every_section_and_figure(tmp_path):
    # run from tmp_path: the registration section caches its sequences in ./.cache, not in the checkout
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--tiny", "--outdir",
                             str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## OBNLM speed", "## Despeckling: this project against", "## U-Net despeckling benchmark",
                    "## Registration benchmark", "## The paper's Table 3, reproduced", "Scaling with volume size",
                    "## Despeckling before registration", "## Refinement steps: what the network saves",
                    "## Where the model is weak", "## The paper's Table 1: SMPI"):
        assert heading in report
    for method in ("scikit-image nl_means 3D", "SimpleITK PatchBasedDenoising", "SRAD slice-wise",
                   "SimpleITK demons", "network only (VoxelMorph, the paper)"):
        assert f"| {method} |" in report
    assert "Machine: " in report and "| nan" not in report.split("## Registration")[1]
    for figure in ("despeckle.png", "registration.png", "registration-steps.png", "unet-real.png"):
        assert (tmp_path / figure).stat().st_size > 1000
    # `--sections` alone reassembles RESULTS.md from the section reports, e.g. after one script ran on its own
    section = tmp_path / "RESULTS-registration.md"
    section.write_text(section.read_text().replace("# Registration benchmark", "# Registration benchmark, rerun", 1))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--sections", "--outdir",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "RESULTS.md").read_text()
    assert "Assembled by `python benchmarks/run_all.py --sections`" in report
    assert "## Registration benchmark, rerun" in report and "## U-Net despeckling benchmark" in report


def test_device_benchmark_tiny_runs_without_simpleitk(tmp_path):
    """bench_device.py runs on a bare GPU machine, where SimpleITK is not installed: blocked here."""
    script = ("import sys, runpy; sys.modules['SimpleITK'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    output = tmp_path / "device.md"
    result = subprocess.run([sys.executable, "-c", script, str(ROOT / "benchmarks" / "bench_device.py"), "--tiny",
                             "--device", "cpu", "--output", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = output.read_text()
    for job in ("| U-Net |", "| VoxelMorph network |", "| VoxelMorph network + 24 refinement steps |",
                "| OBNLM slicewise M=3 alpha=1 |", "| OBNLM 3d M=5 alpha=1 |"):
        assert job in report
    assert "nan" not in report


def test_4d_benchmark_tiny_runs_every_step_through_the_cli(tmp_path):
    output = tmp_path / "4d.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_4d.py"), "--tiny", "--cache",
                             str(tmp_path / "cache"), "--output", str(output)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = output.read_text()
    for step in ("| OBNLM slice-wise M=3 alpha=1 (default) |", "| U-Net unet-obnlm |",
                 "| registration, network + refinement (default) |"):
        assert step in report
    assert "nan" not in report


def test_working_grid_benchmark_tiny_compares_both_grids(tmp_path):
    output = tmp_path / "grid.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_registration_grid.py"), "--tiny",
                             "--output", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = output.read_text()
    assert "| working grid |" in report and "| own grid |" in report and "8x32x32 voxels" in report
    assert "nan" not in report


def test_registration_diagnosis_quick_splits_the_error_at_the_wall(tmp_path):
    output = tmp_path / "diagnosis.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "diagnose_registration.py"), "--quick",
                             "--sets", "varied", "--output", str(output), "--cache", str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in output.read_text().splitlines() if line.startswith("| varied |")]
    assert len(rows) == 1
    pairs, epe, outside, inside = int(rows[0][1]), float(rows[0][2]), float(rows[0][3]), float(rows[0][4])
    assert pairs > 0 and outside < epe < inside  # the wall is where the error is largest
    assert "--quick --sets varied`" in output.read_text() and "| standard |" not in output.read_text()


def test_real_speckle_registration_benchmark_tiny_scores_every_method(tmp_path):
    output = tmp_path / "real.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_registration_real.py"), "--tiny",
                             "--output", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = output.read_text()
    assert "nan" not in report and "Tiny code-path check" in report
    lines = report.splitlines()
    first = lines.index("| method | mean EPE (mm) | worst field (mm) | mean p95 (mm) | max folding (%) | time (s) |")
    table = lines[first + 2:lines.index("", first)]
    means = {row.split(" | ")[0].lstrip("| "): float(row.split(" | ")[1]) for row in table}
    assert len(means) == 4
    rigid = means["rigid only (FFT translation)"]
    default = next(value for name, value in means.items() if name.endswith("(default)"))
    assert 0 < default < rigid  # a smooth deformation on real speckle: the default must beat a translation
