"""Registering on the working grid or on the volume's own grid, at the 4D benchmark's voxel size:
writes benchmarks/RESULTS-registration-grid.md.

The bundled network was trained on volumes with 0.6-1.1 mm between slices; a scan-converted 4D
acquisition often has 0.3 mm. `us3d.registration.pairs.working_size` averages such axes down to the
finest spacing the network was trained on, registers there and interpolates the field back. This
script simulates a breathing sequence at the 4D benchmark's size and spacing (256x256x128 voxels of
0.3 x 0.2 x 0.3 mm, i x j x k; a seed the 4D benchmark does not use) and registers frame 0 to every
other frame both ways (network + refinement, the default), with the endpoint error against the true
motion over the voxels whose true source lies inside the moving volume, and the time per pair.

    python benchmarks/bench_registration_grid.py          # about 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import us3d
from us3d import __version__
from us3d.allocator import reuse_freed_memory
from us3d.io import VolumeSequence
from us3d.phantom import SIMULATOR_VERSION, simulate_sequence
from us3d.phantom.speckle import ImagingSetup
from us3d.registration import pairs
from us3d.registration.fields import field_image

CLINICAL = ImagingSetup(shape=(128, 256, 256), spacing=(0.3, 0.2, 0.3))
TINY = ImagingSetup(shape=(16, 32, 32), spacing=(0.3, 0.2, 0.3))
SEED = 4041
FRAMES = 6


def register_all(sequence: VolumeSequence, displacement: np.ndarray, own_grid: bool) -> list[dict]:
    """Frame 0 registered to frames 1.. on the working grid, or on the volume's own grid."""
    finest = (0.0, 0.0, 0.0) if own_grid else pairs.FINEST_TRAINED_SPACING_MM
    rows = []
    with mock.patch.object(pairs, "FINEST_TRAINED_SPACING_MM", finest):
        registrar = us3d.Registrar(us3d.RegistrationSettings(device="cpu"))
        moving = sequence.frame_image(0)
        for t in range(1, len(sequence)):
            fixed = sequence.frame_image(t)
            result = registrar.register_pair(fixed, moving, field_image(displacement[t], fixed))
            rows.append({"frame": t, "peak": float(np.sqrt((displacement[t] ** 2).sum(-1)).max()),
                         "mean": result.endpoint_error[0], "p95": result.endpoint_error[1],
                         "folding": result.folding, "seconds": result.seconds})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a code-path check on a tiny sequence (for the test suite)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS-registration-grid.md")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the us3d CLI does: simulating a sequence then takes about half the time
    setup, frames = (TINY, 3) if args.tiny else (CLINICAL, FRAMES)
    phantom = simulate_sequence(frames, SEED, setup)
    sequence = VolumeSequence(phantom.bmode, setup.spacing)
    size = pairs.working_size(list(setup.shape), (setup.spacing[2], setup.spacing[1], setup.spacing[0]))
    results = {"working grid": register_all(sequence, phantom.displacement, False),
               "own grid": register_all(sequence, phantom.displacement, True)}
    lines = ["# Registration on the working grid or on the volume's own grid", "",
             f"`python benchmarks/bench_registration_grid.py{' --tiny' if args.tiny else ''}`, us3d {__version__} "
             f"(simulator {SIMULATOR_VERSION}), "
             f"{datetime.date.today().isoformat()}, {args.threads} CPU threads, no GPU. A simulated breathing sequence "
             f"of {frames} frames of {'x'.join(map(str, setup.shape))} voxels (k x j x i), spacing "
             f"{' x '.join(map(str, setup.spacing))} mm (i x j x k), seed {SEED}; frame 0 (exhale) registered to each "
             "other frame by the default (network + refinement). *working grid*: the default, registered on "
             f"{'x'.join(map(str, size))} voxels (axes finer than the network's training data averaged down, the field "
             "interpolated back); *own grid*: on every voxel. EPE in mm against the true motion; time per pair "
             "(pre-processing none, the field's conversion included, the first pair includes loading the model).", "",
             "| frame | peak motion (mm) | working grid: mean EPE | p95 | own grid: mean EPE | p95 | "
             "working grid: time | own grid: time |", "|---|---|---|---|---|---|---|---|"]
    for ours, theirs in zip(results["working grid"], results["own grid"]):
        lines.append(f"| {ours['frame']} | {ours['peak']:.1f} | {ours['mean']:.3f} | {ours['p95']:.2f} | "
                     f"{theirs['mean']:.3f} | {theirs['p95']:.2f} | {ours['seconds']:.1f} s | {theirs['seconds']:.1f} s |")
    summary = {name: (np.mean([r["mean"] for r in rows]), max(r["mean"] for r in rows),
                      np.median([r["seconds"] for r in rows]), max(r["folding"] for r in rows))
               for name, rows in results.items()}
    lines += ["", "| grid | mean EPE (mm) | worst frame (mm) | median time per pair | max folding |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {mean:.3f} | {worst:.3f} | {seconds:.1f} s | {100 * folding:.3f}% |"
              for name, (mean, worst, seconds, folding) in summary.items()]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
