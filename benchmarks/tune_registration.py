"""How the refinement's local normalisation was chosen: writes benchmarks/RESULTS-registration-tuning.md.

The default registration (network, depth-band translations, refinement: `us3d.Registrar`), without the
depth-neighbour step that came after this study (benchmarks/tune_depth_neighbours.py), with the
refinement's volumes normalised locally, over Gaussian windows of each sigma in turn
(`RefinementSettings.local_normalisation`; 0: each volume as a whole, the previous default), on
sequences that no benchmark scores and no training run saw:
- standard: the validation seeds 9200-9201 (`us3d.training.registration.VALIDATION`);
- varied: the validation seeds 9210-9213, and 9220-9225;
- sliding: 9410-9413 and 9420-9423 (16 mm breathing under a wall that does not follow).
Frame 0 to frames 1-7 of each, scored as bench_registration.py scores (its `pairs_of`, `run` and
bands): mean endpoint error (mm) and worst pair per set, mean p95, the sliding set's band of issue
11's goal ([-1, 3) mm below the wall's base), the worst folding and the median time per pair.

    python benchmarks/tune_registration.py            # about 12 min on 2 cores (cached sequences)
    python benchmarks/tune_registration.py --quick    # the first sequence of each set
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch

from us3d import Registrar, RegistrationSettings, __version__
from us3d.allocator import reuse_freed_memory
from us3d.phantom import SIMULATOR_VERSION
from us3d.registration.refine import RefinementSettings
from us3d.training.registration import TEST, TRAINING, VALIDATION, motion_sequences

from bench_registration import BANDS, pairs_of, run  # this folder's benchmark: pairs, truth, scores

#: Sequences for choosing: validation seeds and development seeds outside every training and test set.
TUNING = {"standard": VALIDATION["standard"], "varied": VALIDATION["varied"] + tuple(range(9220, 9226)),
          "sliding": tuple(range(9410, 9414)) + tuple(range(9420, 9424))}
#: Gaussian sigmas (voxels) of the local normalisation; 0: normalised as a whole.
SIGMAS = (0.0, 2.0, 3.0, 4.0)
GOAL_BAND = BANDS[1][2]


def tuning_pairs(quick: bool, cache: str) -> tuple[dict[str, tuple[int, ...]], dict[str, list]]:
    """The seeds of `TUNING` per set (the first of each when `quick`) and their pairs (bench_registration's
    `pairs_of`), sequences simulated or read from `cache`; none of them is a training or test seed."""
    used = {seed for sets in (TRAINING, TEST) for seeds in sets.values() for seed in seeds}
    seeds = {c: s[:1] if quick else s for c, s in TUNING.items()}
    assert not used & {seed for s in seeds.values() for seed in s}, "a tuning seed is a training or test seed"
    return seeds, {c: pairs_of(motion_sequences(c, s, 8, "none", Path(cache)), c) for c, s in seeds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first sequence of each set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=".cache/registration")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS-registration-tuning.md")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the us3d CLI does: simulating a sequence then takes about half the time
    seeds, pairs = tuning_pairs(args.quick, args.cache)
    default = RefinementSettings().local_normalisation
    lines = [
        "# Registration: how the refinement's local normalisation was chosen",
        "",
        f"`python benchmarks/tune_registration.py{' --quick' if args.quick else ''}`, us3d {__version__} "
        f"(simulator {SIMULATOR_VERSION}), {datetime.date.today().isoformat()}, {args.threads} CPU threads. The "
        "default registration (without the later depth-neighbour step: RESULTS-depth-neighbours-tuning.md) with "
        "the refinement's volumes normalised over Gaussian windows of each sigma "
        "(`RefinementSettings.local_normalisation`; 0: each volume as a whole, the previous default) on sequences "
        "no benchmark scores and no training saw: "
        + "; ".join(f"{c} seeds {', '.join(map(str, s))}" for c, s in seeds.items())
        + f"; frame 0 to frames 1-7, {sum(len(p) for p in pairs.values())} pairs. EPE in mm over the voxels whose "
        f"true source lies inside the moving volume, as RESULTS-registration.md scores it; *band*: the sliding "
        f"set's {GOAL_BAND} ([-1, 3) mm). The default is sigma {default:g}.",
        "",
        "| sigma (voxels) | " + " | ".join(f"{c}: mean / worst pair" for c in pairs)
        + " | all: mean | mean p95 | sliding: band | worst folding | time per pair |",
        "|---" * (7 + len(pairs)) + "|",
    ]
    for sigma in SIGMAS:
        registrar = Registrar(RegistrationSettings(device="cpu"), RefinementSettings(local_normalisation=sigma),
                              depth_neighbours=None)  # this study came first: tune_depth_neighbours.py
        rows = {c: run(registrar, p) for c, p in pairs.items()}
        every = [r for c in rows for r in rows[c]]
        lines.append(
            f"| {sigma:g}{' (default)' if sigma == default else ''} | "
            + " | ".join(f"{np.mean([r['epe'] for r in rs]):.3f} / {max(r['epe'] for r in rs):.2f}"
                         for rs in rows.values())
            + f" | {np.mean([r['epe'] for r in every]):.3f} | {np.mean([r['p95'] for r in every]):.2f} | "
            f"{np.nanmean([r[GOAL_BAND] for r in rows['sliding']]):.3f} | "
            f"{100 * max(r['folding'] for r in every):.4f}% | {np.median([r['seconds'] for r in every]):.2f} s |")
        print(lines[-1], flush=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
