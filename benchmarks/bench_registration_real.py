"""Registration on real speckle with a known motion: writes benchmarks/RESULTS-registration-real.md.

The simulated benchmark (`bench_registration.py`) draws its speckle, its anatomy and its breathing
from the project's own simulator, on which the network was trained. Here the texture is real: the
reconstructed freehand B-mode volume of a spine phantom in Resources/SampleData (0.5 mm voxels, about
29% of them inside the sweep), warped by smooth random displacement fields whose values are known:

    fixed(x) = moving(x + u(x)),  u = a bulk shift (4 mm standard deviation per axis) plus a smooth
    deformation (a 4x4x4 grid of Gaussian values, `LOCAL_MM` standard deviation, trilinear).

Each field is registered by rigid only (the FFT translation), the network only, the refinement only
(from the translation) and the default (network + refinement), all through `us3d.Registrar`, and
scored by the endpoint error (EPE) over the voxels of the fixed volume that carry data and whose true
source lies inside the moving volume. Times: one registration, median over the fields, in this process.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from us3d import Registrar, RegistrationSettings, __version__
from us3d.options import DEFAULT_REFINE_STEPS
from us3d.registration.fields import displacement_to_field, field_array, folding_fraction, source_inside
from us3d.registration.voxelmorph import transform
from us3d.resources import sample_data

VOLUME = "SpinePhantomFreehandReconstructed.mha"
LOCAL_MM = (1.0, 2.0, 3.0)  # standard deviation of the smooth deformation, cycled over the fields
BULK_MM = 4.0  # standard deviation of the bulk shift along each axis
FIELDS = 9


def random_field(shape: tuple[int, int, int], spacing_kji: tuple[float, float, float], seed: int) -> np.ndarray:
    """(3, k, j, i) displacement in voxels, channels (k, j, i): a bulk shift plus a smooth deformation
    (see the module's docstring), drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    local = LOCAL_MM[seed % len(LOCAL_MM)]
    coarse = torch.randn((1, 3, 4, 4, 4), generator=generator, dtype=torch.float64) * local
    coarse += torch.randn((1, 3, 1, 1, 1), generator=generator, dtype=torch.float64) * BULK_MM
    mm = F.interpolate(coarse, size=list(shape), mode="trilinear", align_corners=True)[0]
    return (mm / torch.tensor(spacing_kji, dtype=torch.float64).view(3, 1, 1, 1)).float().numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a code-path check: a corner of the volume, 2 fields")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS-registration-real.md")))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--model", help="registration model file or bundled name for the network (default: the "
                                        "bundled voxelmorph)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    volume = sitk.Cast(sitk.ReadImage(str(sample_data(VOLUME))), sitk.sitkFloat32)
    if args.tiny:
        volume = volume[40:88, 30:78, 30:54]
    if np.any(np.abs(np.reshape(volume.GetDirection(), (3, 3)) - np.eye(3)) > 1e-6):
        raise SystemExit(f"{VOLUME}: an axis-aligned volume was expected")
    moving = sitk.GetArrayFromImage(volume)
    spacing = tuple(float(s) for s in volume.GetSpacing()[::-1])
    low = float(moving.min())
    methods = {
        "rigid only (FFT translation)": RegistrationSettings(method="translation", refine_steps=0, device="cpu"),
        "network only (VoxelMorph, the paper)": RegistrationSettings(refine_steps=0, device="cpu", model=args.model),
        f"refinement only, {DEFAULT_REFINE_STEPS} steps from the translation":
            RegistrationSettings(method="translation", device="cpu"),
        f"network + refinement, {DEFAULT_REFINE_STEPS} steps (default)": RegistrationSettings(device="cpu",
                                                                                              model=args.model),
    }
    registrars = {name: Registrar(settings) for name, settings in methods.items()}
    rows: dict[str, list[dict]] = {name: [] for name in methods}
    motions = []
    for seed in range(2 if args.tiny else FIELDS):
        voxels = random_field(moving.shape, spacing, seed)
        fixed = transform(torch.from_numpy(moving)[None, None], torch.from_numpy(voxels)[None])[0, 0].numpy()
        fixed_image = sitk.GetImageFromArray(fixed)
        fixed_image.CopyInformation(volume)
        truth = displacement_to_field(voxels, volume)
        truth_mm = field_array(truth)
        scored = (fixed > low) & source_inside(truth, volume)
        motions.append(float(np.linalg.norm(truth_mm[scored], axis=-1).mean()))
        for name, registrar in registrars.items():  # each field by every method in turn
            result = registrar.register_pair(fixed_image, volume)
            error = np.linalg.norm(field_array(result.field) - truth_mm, axis=-1)[scored]
            rows[name].append({"epe": float(error.mean()), "p95": float(np.percentile(error, 95)),
                               "folding": folding_fraction(result.field), "seconds": result.seconds})
        print(f"field {seed}: mean motion {motions[-1]:.2f} mm; " + ", ".join(
            f"{name.split(' (')[0].split(',')[0]} {rows[name][-1]['epe']:.3f}" for name in methods), flush=True)
    write_report(Path(args.output), volume, rows, motions, args)
    return 0


def write_report(output: Path, volume: sitk.Image, rows: dict[str, list[dict]], motions: list[float],
                 args: argparse.Namespace) -> None:
    names = list(rows)
    rigid, network = (np.mean([r["epe"] for r in rows[n]]) for n in names[:2])
    lines = [
        "# Registration on real speckle with a known motion",
        "",
        f"Written by `python benchmarks/bench_registration_real.py{' --tiny' if args.tiny else ''}"
        f"{' --model ' + args.model if args.model else ''}` on "
        f"{datetime.date.today().isoformat()}: us3d {__version__}, torch {torch.__version__}, SimpleITK "
        f"{sitk.Version.VersionString()}, Python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads, no GPU."
        + (" **Tiny code-path check: the figures mean nothing.**" if args.tiny else ""),
        "",
        f"`{VOLUME}` (real B-mode, {' x '.join(str(n) for n in volume.GetSize())} voxels of "
        f"{volume.GetSpacing()[0]:.1f} mm) warped by {len(motions)} smooth random fields: a bulk shift "
        f"({BULK_MM:g} mm standard deviation per axis) plus a deformation on a 4x4x4 grid "
        f"({' / '.join(f'{a:g}' for a in LOCAL_MM)} mm standard deviation, cycled), mean true motion "
        f"{min(motions):.1f}-{max(motions):.1f} mm over the scored voxels. EPE over the fixed volume's voxels "
        "with data whose true source lies inside the moving volume; worst field: the largest per-field mean; "
        "time: one registration, median over the fields.",
        "",
        "| method | mean EPE (mm) | worst field (mm) | mean p95 (mm) | max folding (%) | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        r = rows[name]
        lines.append(f"| {name} | {np.mean([x['epe'] for x in r]):.3f} | {max(x['epe'] for x in r):.3f} | "
                     f"{np.mean([x['p95'] for x in r]):.2f} | {100 * max(x['folding'] for x in r):.3f} | "
                     f"{np.median([x['seconds'] for x in r]):.2f} |")
    lines += [
        "",
        f"The network alone is {100 * (1 - network / rigid):.0f}% below its rigid step here (mean "
        f"{network:.3f} against {rigid:.3f} mm); on the simulated held-out sequences the goal is 40%.",
        "",
        "| field | mean true motion (mm) | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for index, motion in enumerate(motions):
        lines.append(f"| {index} | {motion:.2f} | " + " | ".join(f"{rows[n][index]['epe']:.3f}" for n in names) + " |")
    output.write_text("\n".join(lines) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    sys.exit(main())
