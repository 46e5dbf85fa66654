"""Whether the depth-neighbour step earns a place in the default: writes
benchmarks/RESULTS-depth-neighbours-tuning.md.

The default registration (`us3d.Registrar`) without (the default) and with
`us3d.registration.layers.with_depth_neighbours` (voxels next to a sliding interface may take the shift
of a voxel up to 3 mm shallower or deeper), its local squared difference on volumes normalised as a
whole or locally (its default), and with a shorter reach and a larger margin, on the sequences of
tune_registration.py: validation and development seeds that no benchmark scores and no training saw.
Scored as bench_registration.py scores: mean endpoint error (mm) and worst pair per set, mean p95, the
sliding set's wall and the band of issue 11's goal ([-1, 3) mm below the wall's base), the worst
folding and the median time per pair (same run).

    python benchmarks/tune_depth_neighbours.py            # about 17 min on 2 cores (cached sequences)
    python benchmarks/tune_depth_neighbours.py --quick    # the first sequence of each set
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

from bench_registration import BANDS, run  # this folder's benchmark: truth, scores
from tune_registration import tuning_pairs  # its validation and development pairs

WALL, GOAL_BAND = BANDS[0][2], BANDS[1][2]
#: (label, the step's settings: `Registrar`'s depth_neighbours, None: off)
VARIANTS = (("without (the default)", None),
            ("with, normalised as a whole", {"local_normalisation": 0.0}),
            ("with, normalised locally", {}),
            ("with, normalised locally, reach 1.8 mm, margin 20%", {"reach_mm": 1.8, "margin": 0.2}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first sequence of each set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=".cache/registration")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS-depth-neighbours-tuning.md")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()
    seeds, pairs = tuning_pairs(args.quick, args.cache)
    lines = [
        "# Registration: the depth-neighbour step, on and off",
        "",
        f"`python benchmarks/tune_depth_neighbours.py{' --quick' if args.quick else ''}`, us3d {__version__} "
        f"(simulator {SIMULATOR_VERSION}), {datetime.date.today().isoformat()}, {args.threads} CPU threads. The "
        "default registration without and with `with_depth_neighbours` on sequences no benchmark scores and no "
        "training saw: " + "; ".join(f"{c} seeds {', '.join(map(str, s))}" for c, s in seeds.items())
        + f"; frame 0 to frames 1-7, {sum(len(p) for p in pairs.values())} pairs. EPE in mm, as "
        f"RESULTS-registration.md scores it; *wall*, *band*: the sliding set's {WALL} and {GOAL_BAND} ([-1, 3) mm).",
        "",
        "| depth-neighbour step | " + " | ".join(f"{c}: mean / worst pair" for c in pairs)
        + " | all: mean | mean p95 | sliding: wall | sliding: band | worst folding | time per pair |",
        "|---" * (8 + len(pairs)) + "|",
    ]
    for label, settings in VARIANTS:
        registrar = Registrar(RegistrationSettings(device="cpu"), depth_neighbours=settings)
        rows = {c: run(registrar, p) for c, p in pairs.items()}
        every = [r for c in rows for r in rows[c]]
        lines.append(
            f"| {label} | " + " | ".join(f"{np.mean([r['epe'] for r in rs]):.3f} / {max(r['epe'] for r in rs):.2f}"
                                         for rs in rows.values())
            + f" | {np.mean([r['epe'] for r in every]):.3f} | {np.mean([r['p95'] for r in every]):.2f} | "
            f"{np.nanmean([r[WALL] for r in rows['sliding']]):.3f} | "
            f"{np.nanmean([r[GOAL_BAND] for r in rows['sliding']]):.3f} | "
            f"{100 * max(r['folding'] for r in every):.4f}% | {np.median([r['seconds'] for r in every]):.2f} s |")
        print(lines[-1], flush=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
