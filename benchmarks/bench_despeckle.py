"""Despeckling against the peers: writes benchmarks/RESULTS-despeckle.md and despeckle.png (run: make bench).

Our OBNLM (slice-wise and 3D) and U-Net side by side with the tools a Slicer or Python user would
otherwise pick (see peers.py for each and its settings), on the same volumes:
- held-out simulated liver volumes (seeds >= 9000, never trained on) with ground truth: SMPI and
  ENL (parenchyma), gCNR (lesions vs parenchyma), PSNR and SSIM against the speckle-free truth;
- the real volumes in the repo (no truth): SMPI and ENL over the voxels with data;
- run time on a 128x128x32 volume (median of several runs in this process, after a warm-up,
  ratio to our default OBNLM) and peak memory (a fresh process per method; peak RSS above the
  process's RSS before the call);
- scaling: time and peak memory against volume size (64^2x16 to 512^2x128, a simulated volume
  mirrored to size) and against sequence length, on the CPU (and CUDA when present).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from peers import METHODS, measure_in_child
from timing import median_time

from us3d import __version__, metrics
from us3d.phantom import LABELS, simulate_volume
from us3d.resources import sample_data
from us3d.views import centre_slices, side_by_side, to_grey, write_png

SEEDS = (9000, 9001, 9002, 9003)
REAL = ("MouseLiverB.mha", "SpinePhantomFreehandReconstructed.mha")
SPACING = (0.4, 0.3, 0.8)
SIZES = ((16, 64, 64), (32, 128, 128), (64, 256, 256), (128, 512, 512))
#: Largest size (voxels) each method is run at in the scaling study: the slow ones stop earlier so
#: that `make bench` stays under 30 minutes (their time grows linearly, see the table).
SCALING_LIMIT = {"OBNLM 3d (ours)": 64 * 256 * 256, "scikit-image nl_means 3D": 64 * 256 * 256,
                 "SimpleITK PatchBasedDenoising": 32 * 128 * 128, "SRAD slice-wise": 64 * 256 * 256}
#: Methods too slow to repeat: timed once.
SLOW = ("SimpleITK PatchBasedDenoising",)
BASELINE = "OBNLM slice-wise (ours)"


def quality(seeds, real_names, crop, real_crop, methods) -> dict[str, list[dict]]:
    """Per method, one row of metrics per volume."""
    rows: dict[str, list[dict]] = {name: [] for name in methods}
    for seed in seeds:
        phantom = simulate_volume(seed)
        bmode = phantom.bmode[0][crop].astype(np.float32)
        clean, labels = phantom.echogenicity[0][crop].astype(np.float64), phantom.labels[0][crop]
        lesions = np.isin(labels, [LABELS["lesion_hypoechoic"], LABELS["lesion_hyperechoic"], LABELS["cyst"]])
        parenchyma = labels == LABELS["parenchyma"]
        for name, (method, _) in methods.items():
            out = method(bmode, SPACING).astype(np.float64)
            rows[name].append({"volume": f"phantom seed {seed}", "output": out, "input": bmode,
                               "smpi": metrics.smpi(bmode.astype(np.float64), out, parenchyma),
                               "enl": metrics.enl(out, parenchyma),
                               "gcnr": metrics.gcnr(out, lesions, parenchyma) if lesions.any() else float("nan"),
                               "psnr": metrics.psnr(out, clean, data_range=255),
                               "ssim": metrics.ssim(out, clean, data_range=255)})
    for real in real_names:
        image = sitk.ReadImage(str(sample_data(real)))
        volume = sitk.GetArrayFromImage(image).astype(np.float32)[real_crop]
        mask = volume > 0
        for name, (method, _) in methods.items():
            out = method(volume, image.GetSpacing()).astype(np.float64)
            rows[name].append({"volume": real, "smpi": metrics.smpi(volume.astype(np.float64), out, mask),
                               "enl": metrics.enl(out, mask)})
    return rows


def timing(volume: np.ndarray, repeats: int, methods) -> dict[str, float]:
    return {name: median_time(lambda: method(volume, SPACING), 1 if name in SLOW else repeats)
            for name, (method, _) in methods.items()}


def scaling(volume: np.ndarray, sizes, threads: int, folder: Path, methods) -> dict[str, dict[tuple, dict]]:
    path = folder / "volume.npy"
    np.save(path, volume)
    out: dict[str, dict[tuple, dict]] = {name: {} for name in methods}
    for name in methods:
        for shape in sizes:
            if np.prod(shape) > SCALING_LIMIT.get(name, np.inf):
                continue
            repeats = 3 if np.prod(shape) <= 32 * 128 * 128 and name not in SLOW else 1
            out[name][shape] = measure_in_child(name, shape, repeats, path, threads)
            print(f"scaling: {name} {shape}: {out[name][shape]}", file=sys.stderr, flush=True)
    return out


def sequence_scaling(volume: np.ndarray, lengths, repeats: int) -> dict[str, dict[int, float]]:
    """Seconds to despeckle sequences of `lengths` frames through us3d.despeckle (OBNLM and U-Net)."""
    import us3d
    from us3d.io import VolumeSequence

    out = {}
    for name, method in (("OBNLM slice-wise (ours)", "obnlm"), ("U-Net unet-obnlm (ours)", "unet")):
        out[name] = {n: median_time(lambda: us3d.despeckle(VolumeSequence(np.repeat(volume[None], n, 0), SPACING),
                                                           method, device="cpu"), repeats) for n in lengths}
    return out


def figure(rows: dict[str, list[dict]], path: Path) -> None:
    """Centre B-mode plane of the first simulated volume: input, then one panel per method."""
    first = {name: method_rows[0] for name, method_rows in rows.items()}
    volumes = [next(iter(first.values()))["input"]] + [row["output"] for row in first.values()]
    panels = [to_grey(centre_slices(v, SPACING)[0], (0.0, 255.0)) for v in volumes]
    panels += [np.full_like(panels[0], 255)] * (8 - len(panels))  # 4 panels a row: the same width
    top, bottom = side_by_side(panels[:4]), side_by_side(panels[4:8])
    write_png(np.concatenate([top, np.full((4, top.shape[1]), 255, np.uint8), bottom]), path)


def _mean(rows, key, digits=3):
    values = [r[key] for r in rows if key in r and np.isfinite(r[key])]
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}" if values else "n/a"


def report(rows, times, peaks, scale, sequences, args, figure_name) -> str:
    sim = {name: [r for r in method_rows if r["volume"].startswith("phantom")] for name, method_rows in rows.items()}
    real = {name: [r for r in method_rows if not r["volume"].startswith("phantom")] for name, method_rows in rows.items()}
    lines = [
        "# Despeckling: this project against the tools a user would otherwise pick",
        "",
        f"Written by `python benchmarks/bench_despeckle.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today().isoformat()}: us3d {__version__}, torch {torch.__version__}, SimpleITK "
        f"{sitk.Version.VersionString()}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, {args.threads} threads per method.",
        "",
        "Settings of each method: `benchmarks/peers.py`. Ours: OBNLM at the project default (M=3, alpha=1, h=0.7; "
        "the 3d mode with the same radii) and the bundled `unet-obnlm`.",
        "",
        f"## Simulated liver volumes with ground truth ({len(next(iter(sim.values())))} held-out volumes, "
        "mean ± std)",
        "",
        "SMPI (lower = more speckle suppression with the mean kept) and ENL (higher = smoother) in the parenchyma; "
        "gCNR of lesions and cyst against parenchyma (1 = separable); PSNR (peak 255) and SSIM against the "
        "speckle-free echogenicity. Time: one 128x128x32 volume, median of "
        f"{args.repeats} runs (PatchBasedDenoising: 1) in this process, and its ratio to our default OBNLM. "
        "Peak memory: peak RSS above the RSS before the call, in a fresh process.",
        "",
        "| method | SMPI | ENL | gCNR | PSNR (dB) | SSIM | time (s) | time / ours | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in rows:
        lines.append(f"| {name} | {_mean(sim[name], 'smpi')} | {_mean(sim[name], 'enl', 2)} "
                     f"| {_mean(sim[name], 'gcnr')} | {_mean(sim[name], 'psnr', 2)} | {_mean(sim[name], 'ssim')} "
                     f"| {times[name]:.3f} | {times[name] / times[BASELINE]:.1f}x | "
                     + (f"{peaks[name]:.0f} |" if name in peaks else "n/a |"))
    if any(real.values()):
        lines += ["", "## Real volumes (no ground truth; over the voxels with data)", "",
                  "| method | " + " | ".join(f"{r['volume']}: SMPI | ENL" for r in real[BASELINE]) + " |",
                  "|---|" + "---|---|" * len(real[BASELINE])]
        for name in rows:
            lines.append(f"| {name} | " + " | ".join(f"{r['smpi']:.3f} | {r['enl']:.2f}" for r in real[name]) + " |")
    lines += ["", f"![one slice per method]({figure_name})", "",
              f"`{figure_name}`: centre B-mode plane of {next(iter(sim.values()))[0]['volume']}; top: input, "
              + ", ".join(list(rows)[:3]) + "; bottom: " + ", ".join(list(rows)[3:]) + ".", ""]
    sizes = sorted({shape for per in scale.values() for shape in per}, key=np.prod)
    lines += ["## Scaling with volume size (CPU)", "",
              f"Seconds per volume (median of 3 up to 128x128x32, then 1 run) and peak memory (MiB) in a fresh process "
              f"per method and size, {args.threads} threads; a simulated volume mirrored to size. Blank: not run at "
              "that size (too slow for the benchmark's time budget).", "",
              "| method | " + " | ".join(f"{s[2]}x{s[1]}x{s[0]}" for s in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for name in scale:
        cells = [f"{scale[name][s]['seconds']:.2f} s, {scale[name][s]['peak_mib']:.0f} MiB" if s in scale[name] else ""
                 for s in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lengths = sorted(next(iter(sequences.values())))
    lines += ["", "## Scaling with sequence length (128x128x32 frames, CPU, through `us3d.despeckle`)", "",
              "| method | " + " | ".join(f"{n} frames" for n in lengths) + " | per frame at the longest |",
              "|---|" + "---|" * (len(lengths) + 1)]
    for name, per in sequences.items():
        lines.append(f"| {name} | " + " | ".join(f"{per[n]:.2f} s" for n in lengths)
                     + f" | {per[lengths[-1]] / lengths[-1]:.3f} s |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 volumes, sizes up to 128x128x32, fewer repeats, without the slow peers")
    parser.add_argument("--tiny", action="store_true", help="a code-path check on tiny crops (for the test suite)")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS-despeckle.md")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scaling", nargs="+", metavar="METHOD",
                        help="only the scaling study of these methods (names as in the tables), printed with the "
                             "cost per voxel against 256x256x64; RESULTS is not rewritten")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.scaling:
        return scaling_only(args.scaling, args.threads)
    if args.tiny:
        seeds, real_names, crop, sizes, lengths, args.repeats = SEEDS[:1], REAL[:1], np.s_[12:20, 48:80, 48:80], \
            SIZES[:1], (1, 2), 1
    elif args.quick:
        seeds, real_names, crop, sizes, lengths, args.repeats = SEEDS[:2], REAL, np.s_[:], SIZES[:2], (1, 4), 3
    else:
        seeds, real_names, crop, sizes, lengths, args.repeats = SEEDS, REAL, np.s_[:], SIZES, (1, 4, 16), 5
    output = Path(args.output)
    # the quick mode leaves out the slow peers (PatchBasedDenoising alone takes over 5 minutes here)
    methods = {name: entry for name, entry in METHODS.items() if not (args.quick and name in SLOW)}
    rows = quality(seeds, real_names, crop, np.s_[:4, 40:72, 40:72] if args.tiny else np.s_[:], methods)
    volume = simulate_volume(SEEDS[0]).bmode[0].astype(np.float32)[crop]
    times = timing(volume, args.repeats, methods)
    # the tiny mode checks the child-process path with two methods only, and scaling with one
    in_children = (BASELINE, "SimpleITK CurvatureAnisotropicDiffusion") if args.tiny else tuple(methods)
    with tempfile.TemporaryDirectory() as folder:
        peaks = {name: measure_in_child(name, volume.shape, 1, _saved(volume, folder), args.threads)["peak_mib"]
                 for name in in_children}
        scale = scaling(volume if args.tiny else simulate_volume(SEEDS[1]).bmode[0].astype(np.float32), sizes,
                        args.threads, Path(folder), in_children[:1] if args.tiny else in_children)
    sequences = sequence_scaling(volume, lengths, 1 if args.tiny else 3)
    figure_path = output.with_name(output.stem.replace("RESULTS-", "") + ".png")
    figure(rows, figure_path)
    text = report(rows, times, peaks, scale, sequences, args, figure_path.name)
    output.write_text(text)
    print(text)
    return 0


def scaling_only(names: list[str], threads: int) -> int:
    """Print seconds, peak memory and the time per voxel relative to 256x256x64 for each size."""
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        print(f"unknown method {unknown[0]!r}; one of: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    volume = simulate_volume(SEEDS[1]).bmode[0].astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        scale = scaling(volume, SIZES, threads, Path(folder), {name: METHODS[name] for name in names})
    print(f"| method | size | seconds | peak memory (MiB) | time per voxel / 256x256x64 |  ({threads} threads)")
    print("|---|---|---|---|---|")
    for name, per in scale.items():
        reference = per.get((64, 256, 256))
        for shape, figures in per.items():
            ratio = (figures["seconds"] / np.prod(shape)) / (reference["seconds"] / np.prod((64, 256, 256))) \
                if reference else float("nan")
            print(f"| {name} | {shape[2]}x{shape[1]}x{shape[0]} | {figures['seconds']:.2f} | "
                  f"{figures['peak_mib']:.0f} | {ratio:.2f} |")
    return 0


def _saved(volume: np.ndarray, folder: str) -> Path:
    path = Path(folder) / "timed.npy"
    np.save(path, volume)
    return path


if __name__ == "__main__":
    sys.exit(main())
