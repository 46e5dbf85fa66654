"""Clinical-size 4D sequences end to end through the CLI: writes benchmarks/RESULTS-4d.md.

A simulated breathing sequence of 40 frames of 256x256x128 voxels (0.3 x 0.2 x 0.3 mm, i x j x k;
about the size of a scan-converted 4D liver acquisition) is despeckled with OBNLM (the default,
slice-wise M=3 alpha=1) and with the U-Net, and registered (the default: network + refinement,
exhale frame 0 to every frame), each by `us3d` in its own process, as a user runs it. For each step:
- seconds per frame: the median interval between the CLI's per-frame progress lines;
- the process's resident memory (RSS) after frames 10, 20 and 40, read from /proc when the
  progress line appears, and its peak RSS (from the kernel's accounting when it exits);
- the size of the input sequence as the step holds it, the floor a run cannot go under (outputs are
  written frame by frame as they are made, `us3d.io.SequenceWriter`).

    python benchmarks/bench_4d.py                  # about 40 min on 2 cores
    python benchmarks/bench_4d.py --frames 12      # shorter

The simulated sequence is cached (`--cache`), so a second run skips the simulation.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from us3d import __version__
from us3d.phantom import simulate_sequence
from us3d.phantom.speckle import ImagingSetup

CLINICAL = ImagingSetup(shape=(128, 256, 256), spacing=(0.3, 0.2, 0.3))
TINY = ImagingSetup(shape=(8, 32, 32))
SEED = 4040
CHECKPOINTS = (10, 20, 40)
#: key: (name, us3d arguments, output, bytes per voxel of the input as held in memory)
STEPS = {"obnlm": ("OBNLM slice-wise M=3 alpha=1 (default)", ["despeckle"], "obnlm.seq.nrrd", 1),
         "unet": ("U-Net unet-obnlm", ["despeckle", "--method", "unet"], "unet.seq.nrrd", 1),
         "registration": ("registration, network + refinement (default)", ["register-sequence"], "registered",
                          1 + 4)}
STEP_NAMES = tuple(STEPS)


def _rss_gib(pid: int) -> float:
    """Resident memory of a running process (GiB), from /proc; nan where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def run_step(arguments: list[str], frames: int) -> dict:
    """Run `us3d <arguments>`; per-frame times, RSS at the checkpoints, peak RSS, wall time."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "us3d"] + arguments, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    stamps, rss, messages = [], {}, []
    for line in process.stderr:
        if ": frame " in line:
            done = int(line.rsplit(" ", 1)[1].split("/")[0])
            if done == 0:  # the step is ready (model loaded, inputs pre-processed): the first frame starts
                continue
            stamps.append(time.perf_counter())
            if done in CHECKPOINTS or done == frames:
                rss[done] = _rss_gib(process.pid)
        else:
            messages.append(line.rstrip())
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"us3d {' '.join(arguments)} failed: " + "\n".join(messages[-5:]))
    intervals = np.diff([start] + stamps)
    return {"seconds_per_frame": statistics.median(intervals[1:]) if len(intervals) > 1 else float(intervals[0]),
            "first_frame": float(intervals[0]), "wall": time.perf_counter() - start,
            "peak": usage.ru_maxrss / 2**20, "rss": rss}


def _median_pair_seconds(metrics: Path) -> float | None:
    """Median registration time of one pair (the CLI's metrics.csv `seconds` column); None for other steps."""
    if not metrics.is_file():
        return None
    import csv

    with metrics.open() as stream:
        return statistics.median(float(row["seconds"]) for row in csv.DictReader(stream))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="frames in the sequence (default 40)")
    parser.add_argument("--tiny", action="store_true", help="a code-path check: 3 frames of 8x32x32 (for the test suite)")
    parser.add_argument("--cache", default=".cache/bench4d", help="where the simulated sequence is kept")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS-4d.md")))
    parser.add_argument("--steps", nargs="+", choices=STEP_NAMES, default=list(STEP_NAMES),
                        help="which steps to run (default: all three)")
    parser.add_argument("--simulate-into", help=argparse.SUPPRESS)  # internal: the child that simulates
    args = parser.parse_args(argv)
    setup, frames = (TINY, 3) if args.tiny else (CLINICAL, args.frames)
    import us3d

    def simulate_into(path: str) -> None:
        us3d.write(simulate_sequence(frames, SEED, setup).to_sequence(), path)

    if args.simulate_into:
        simulate_into(args.simulate_into)
        return 0

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    size = "x".join(map(str, setup.shape))
    sequence_path = cache / f"liver-{size}-{frames}-{SEED}.seq.nrrd"
    simulated = ""
    if not sequence_path.exists():
        # In a child process: Linux carries a parent's high-water resident memory into the peak RSS
        # (wait4) of the children it spawns, so this process must stay small (the first 12-frame report's 3.9 GiB
        # peaks were the simulation's memory, not the steps'). The tiny check's 3 frames of 8x32x32 are
        # simulated here: a few MiB, and a child's start-up (about 4 s) is most of the check's time.
        start = time.perf_counter()
        if args.tiny:
            simulate_into(str(sequence_path))
        else:
            subprocess.run([sys.executable, __file__, "--simulate-into", str(sequence_path), "--frames", str(frames)],
                           check=True)
        simulated = f" (simulated in {time.perf_counter() - start:.0f} s)"
    parent_rss = _rss_gib(os.getpid())
    voxels = int(np.prod(setup.shape)) * frames
    steps = [step for key, step in STEPS.items() if key in args.steps]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, command, output, bytes_per_voxel in steps:
            target = str(Path(work) / output)
            arguments = command + [str(sequence_path), target]
            figures = run_step(arguments, frames)
            floor = voxels * bytes_per_voxel / 2**30
            pair = _median_pair_seconds(Path(target) / "metrics.csv")
            rss = " / ".join(f"{figures['rss'][c]:.2f}" if c in figures["rss"] else "–" for c in CHECKPOINTS)
            rows.append(f"| {name} | {figures['seconds_per_frame']:.2f} s (first frame {figures['first_frame']:.1f} s) "
                        f"| {'–' if pair is None else f'{pair:.2f} s'} | {figures['wall'] / 60:.1f} min | {rss} | {figures['peak']:.2f} | {floor:.2f} |")
            print(rows[-1], flush=True)
    lines = [f"# 4D sequences end to end: {frames} frames of {size} voxels", "",
             f"`python benchmarks/bench_4d.py{' --tiny' if args.tiny else ''}"
             f"{'' if args.tiny or frames == 40 else f' --frames {frames}'}"
             f"{'' if len(args.steps) == len(STEPS) else ' --steps ' + ' '.join(args.steps)}`, us3d {__version__}, "
             f"{datetime.date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPU cores, no GPU "
             f"(torch's default threads). A simulated breathing sequence{simulated}, spacing "
             f"{' x '.join(map(str, setup.spacing))} mm (i x j x k), run through the `us3d` CLI, one process "
             "per step. Seconds per frame: the median interval between per-frame progress lines. Memory in GiB: "
             "the process's resident memory when the progress line of frame 10, 20 and 40 appears, its peak, "
             "and the input sequence as held in memory (uint8; registration also the float32 copy the network "
             "reads); the outputs (float32 frames, registration's fields) are written to disk as they are made. "
             f"Each step's process is spawned by this script, whose resident memory was then {parent_rss:.2f} GiB "
             "(Linux counts a parent's high-water memory into its spawned children's peak RSS).",
             "Registering the pair: the median of the `seconds` column of the run's metrics.csv, the "
             "registration of one frame pair (network and refinement, the field in mm), without pre-processing, "
             "the figures, the warped frame and writing the field.",
             "", "| step | time per frame | registering the pair | wall | RSS after frames 10 / 20 / 40 | peak RSS "
             "| input held |",
             "|---|---|---|---|---|---|---|"] + rows
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
