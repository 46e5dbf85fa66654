"""How the per-pair refinement's defaults were chosen: writes benchmarks/RESULTS-refinement-tuning.md.

Every variant refines the bundled network's field on the *validation* sequences only (standard
seeds 9200-9201 and varied 9210-9213, as in the VoxelMorph model card, plus sliding seeds 9410-9411,
which no benchmark uses), never on the benchmark's test seeds: 8 frames each, frame 0 to frames 1-7.
For each: mean endpoint error (mm, over voxels whose true source is inside the moving volume) overall,
worst pair and per condition, mean p95, the worst pair's folding (voxels with det J <= 0, as ITK
computes it) and the median time per pair. These are `refine`'s settings alone, from the network's
field: without the depth-band translations (`us3d.registration.layers`) that `Registrar` runs first.
Each variant changes the previous default
(`RefinementSettings`) as listed; the last row is today's default. A second table changes one
setting of today's default at a time, rechecked once the simulator's sliding wall was fixed.

    python benchmarks/tune_refinement.py            # about 10 min on 2 cores
    python benchmarks/tune_refinement.py --quick    # first sequence of each condition
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

from us3d import __version__
from us3d.allocator import reuse_freed_memory
from us3d.models.bundle import load_model
from us3d.phantom import SIMULATOR_VERSION
from us3d.registration.refine import RefinementSettings, jacobian_determinant, refine
from us3d.training.registration import VALIDATION, motion_sequences, source_inside_voxels, truth_in_voxels

TUNING = dict(VALIDATION, sliding=(9410, 9411))
#: The refinement of the previous release, before this tuning.
PREVIOUS = RefinementSettings(steps=24, levels=(4, 2), control_spacing=(2, 2, 2), learning_rate=0.3, smoothing=1.0,
                              local_normalisation=0.0,
                              unfold_passes=0)
#: (label, changes to PREVIOUS), in the order they were tried; None: the network alone.
VARIANTS = [
    ("network alone (no refinement)", None),
    ("previous default: 24 steps, levels 4,2, control 2x2x2, lr 0.3, smoothing 1", {}),
    ("8 steps", {"steps": 8}),
    ("48 steps", {"steps": 48}),
    ("initial smoothing 0", {"initial_smoothing": 0.0}),
    ("regularisation 0.03", {"regularisation_weight": 0.03}),
    ("regularisation 0.3", {"regularisation_weight": 0.3}),
    ("levels 2,1 (full resolution last)", {"levels": (2, 1)}),
    ("levels 2,1, smoothing 0.5", {"levels": (2, 1), "smoothing": 0.5}),
    ("levels 2,1, smoothing 0", {"levels": (2, 1), "smoothing": 0.0}),
    ("levels 2,1, smoothing 0.5, lr 0.15", {"levels": (2, 1), "smoothing": 0.5, "learning_rate": 0.15}),
    ("levels 2,1, smoothing 0.5, lr 0.15, control 2x4x4",
     {"levels": (2, 1), "smoothing": 0.5, "learning_rate": 0.15, "control_spacing": (2, 4, 4)}),
    ("levels 2,1, smoothing 0.5, lr 0.15, control 4x8x8, unfold",
     {"levels": (2, 1), "smoothing": 0.5, "learning_rate": 0.15, "control_spacing": (4, 8, 8), "unfold_passes": 16}),
    ("today's default (RefinementSettings())", "default"),
]
#: Rechecked after the simulator's sliding wall was fixed (simulator 2) and the network retrained on
#: it: (label, changes to today's default), each alone.
RECHECKS = [
    ("48 steps", {"steps": 48}),
    ("96 steps", {"steps": 96}),
    ("lr 0.3", {"learning_rate": 0.3}),
    ("regularisation 0.03", {"regularisation_weight": 0.03}),
    ("regularisation 0.3", {"regularisation_weight": 0.3}),
    ("diffusion instead of the sliding (Charbonnier) penalty", {"sliding": False}),
    ("three quarters of the steps at half resolution", {"level_share": (0.75, 0.25)}),
    ("levels 4,2,1", {"levels": (4, 2, 1), "level_share": (0.34, 0.33, 0.33)}),
    ("initial smoothing 0", {"initial_smoothing": 0.0}),
    ("initial smoothing 4", {"initial_smoothing": 4.0}),
]


def evaluate(sequences, network, settings: RefinementSettings | None) -> dict:
    errors, p95s, folds, times, by_condition = [], [], [], [], {}
    for sequence in sequences:
        spacing = (sequence.spacing[2], sequence.spacing[1], sequence.spacing[0])
        to_mm = torch.tensor(spacing).view(1, 3, 1, 1, 1)
        moving = torch.from_numpy(sequence.frame(0))[None, None]
        for t in range(1, len(sequence.frames)):
            fixed = torch.from_numpy(sequence.frame(t))[None, None]
            start = time.perf_counter()
            with torch.inference_mode():
                displacement = network(fixed, moving)
            if settings is not None:
                with torch.enable_grad():
                    displacement = refine(fixed, moving, displacement.clone(), spacing, settings).detach()
            times.append(time.perf_counter() - start)
            truth = torch.from_numpy(truth_in_voxels(sequence.true_field(t), sequence.spacing))[None]
            error = ((displacement - truth) * to_mm).pow(2).sum(1).sqrt()[0][source_inside_voxels(truth)[0, 0]]
            errors.append(float(error.mean()))
            p95s.append(float(np.percentile(error.numpy(), 95)))
            folds.append(float((jacobian_determinant(displacement) <= 0).float().mean()))
            by_condition.setdefault(sequence.name.split()[0], []).append(errors[-1])
    return {"mean": np.mean(errors), "worst": max(errors), "p95": np.mean(p95s), "folding": max(folds),
            "seconds": float(np.median(times)), "conditions": {c: np.mean(v) for c, v in by_condition.items()}}


def _row(label: str, r: dict, conditions: list[str]) -> str:
    return (f"| {label} | {r['mean']:.3f} | {r['worst']:.3f} | "
            + " | ".join(f"{r['conditions'][c]:.3f}" for c in conditions)
            + f" | {r['p95']:.2f} | {100 * r['folding']:.3f}% | {r['seconds']:.2f} s |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first sequence of each condition")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=".cache/registration")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS-refinement-tuning.md")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the us3d CLI does: simulating a sequence then takes about half the time
    sequences = [s for condition, seeds in TUNING.items()
                 for s in motion_sequences(condition, seeds[:1] if args.quick else seeds, 8, "none", Path(args.cache))]
    network = load_model("voxelmorph").module
    conditions = list(TUNING)
    header = ["| {} | mean EPE | worst pair | " + " | ".join(conditions)
              + " | mean p95 | worst folding | time per pair |",
              "|---" * (6 + len(conditions)) + "|"]
    lines = ["# Per-pair refinement: how the defaults were chosen", "",
             f"`python benchmarks/tune_refinement.py{' --quick' if args.quick else ''}`, us3d {__version__} "
             f"(simulator {SIMULATOR_VERSION}), "
             f"{datetime.date.today().isoformat()}, {args.threads} CPU threads. Validation sequences only: "
             + ", ".join(f"{c} seeds {', '.join(map(str, TUNING[c][:1] if args.quick else TUNING[c]))}"
                         for c in conditions)
             + f"; {sum(len(s.frames) - 1 for s in sequences)} pairs. EPE in mm.", "",
             header[0].format("variant (changes to the previous default)"), header[1]]
    for label, changes in VARIANTS:
        settings = (None if changes is None else RefinementSettings() if changes == "default"
                    else dataclasses.replace(PREVIOUS, **changes))
        lines.append(_row(label, evaluate(sequences, network, settings), conditions))
        print(lines[-1], flush=True)
    lines += ["", "## Rechecked on simulator 2", "",
              "Each row changes one setting of today's default (the last row above); a change is adopted only if it "
              "lowers the mean, the worst pair and every condition's mean within the 0.3 s per pair of issue 11.",
              "",
              header[0].format("change to today's default"), header[1]]
    for label, changes in RECHECKS:
        lines.append(_row(label, evaluate(sequences, network, dataclasses.replace(RefinementSettings(), **changes)),
                          conditions))
        print(lines[-1], flush=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
