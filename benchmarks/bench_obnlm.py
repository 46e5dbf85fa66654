"""OBNLM and phantom benchmark: writes benchmarks/RESULTS-obnlm.md (run: make bench).

Times are medians of several runs on a 128x128x32 simulated liver volume, after a warm-up run.
The baseline, measured in the same run, is the vectorised torch implementation of the same
kernel on the CPU (one loop over search offsets; the path used on CUDA). Peak memory of the
3D mode on a 512x512x128 volume is the peak RSS of a child process.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from timing import median_time

from us3d.filters import obnlm
from us3d.filters._obnlm_torch import obnlm_padded_torch
from us3d.phantom import simulate_sequence, simulate_volume

CASES = [("slicewise", 7, 3, 1.2), ("slicewise", 3, 1, 0.08), ("3d", 5, 1, 3.0)]


def torch_cpu(volume: np.ndarray, mode: str, m: int, a: int):
    """Same wrapper steps as us3d.filters.obnlm, torch kernel on the CPU."""
    x = (volume - volume.min()) / (volume.max() - volume.min()) * 255.0 + 100
    if mode == "slicewise":
        padded = np.pad(x, ((0, 0), (a, a), (a, a)), mode="symmetric")
        params = ((0, m, m), (0, a, a), (1, 2, 2), (0, 1, 1))
    else:
        padded = np.pad(x, a, mode="symmetric")
        params = ((m, m, m), (a, a, a), (2, 2, 2), (1, 1, 1))
    return lambda: obnlm_padded_torch(torch.from_numpy(padded), *params, 0.7, 0.8, 1.25)


def peak_memory_child() -> None:
    volume = np.random.default_rng(0).integers(0, 256, (128, 512, 512)).astype(np.uint8)
    obnlm(volume, "3d", search_radius=1, block_radius=1, device="cpu")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)  # GiB (ru_maxrss in KiB)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no 512^2x128 memory run")
    parser.add_argument("--tiny", action="store_true", help="a code-path check on a tiny crop (for the test suite)")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS-obnlm.md")))
    args = parser.parse_args(argv)
    args.quick = args.quick or args.tiny
    repeats = 1 if args.tiny else 3 if args.quick else 7

    volume = simulate_volume(0).bmode[0]
    if args.tiny:
        volume = volume[:8, :32, :32].copy()
    rows = []
    for mode, m, a, goal in CASES:
        ours = median_time(lambda: obnlm(volume, mode, m, a, device="cpu"), repeats)
        # the quick mode measures the (slow) torch baseline at the project default only
        slow_baseline = args.quick and (mode, m, a) != ("slicewise", 3, 1)
        baseline = None if slow_baseline else median_time(torch_cpu(volume, mode, m, a), max(1, repeats // 3))
        rows.append((mode, m, a, ours, baseline, goal))
        print(f"{mode} M={m} alpha={a}: {ours:.3f} s (torch CPU {baseline} s)", file=sys.stderr)

    start = time.perf_counter()
    frames = 1 if args.tiny else 8
    simulate_sequence(frames, seed=0)
    phantom_per_frame = (time.perf_counter() - start) / frames

    memory = None
    if not args.quick:
        child = subprocess.run([sys.executable, __file__, "--memory-child"], capture_output=True, text=True, check=True)
        memory = float(child.stdout.strip().splitlines()[-1])

    lines = [
        "# OBNLM speed",
        "",
        f"Measured {datetime.date.today().isoformat()} by `python benchmarks/bench_obnlm.py` on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, numba kernel on {torch.get_num_threads()} threads. "
        f"Median of {repeats} runs after a warm-up.",
        "",
        f"## OBNLM on one {'x'.join(map(str, volume.shape[::-1]))} volume (CPU)",
        "",
        "| mode | M | alpha | us3d (s) | goal (s) | torch CPU baseline (s) | speed-up vs baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, m, a, ours, baseline, goal in rows:
        if baseline is None:
            lines.append(f"| {mode} | {m} | {a} | {ours:.3f} | {goal} | not measured (quick mode) | |")
        else:
            lines.append(f"| {mode} | {m} | {a} | {ours:.3f} | {goal} | {baseline:.3f} | {baseline / ours:.1f}x |")
    lines += [
        "",
        "For reference (not measured here): the public 2D kernel took 6.0 s (M=7, alpha=3) and 0.39 s "
        "(M=3, alpha=1) single-process on this machine kind (shared/reference/OBNLM.md).",
        "",
        "## Other figures",
        "",
        f"- Phantom simulation: {phantom_per_frame:.2f} s per 128x128x32 frame ({frames}-frame sequence, set-up "
        "included).",
    ]
    if memory is not None:
        lines.append(f"- Peak RSS of OBNLM 3d mode on a 512x512x128 volume (M=1, alpha=1; memory does not grow "
                     f"with M): {memory:.2f} GiB (goal: under 4 GB).")
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--memory-child"]:
        peak_memory_child()
    else:
        sys.exit(main())
