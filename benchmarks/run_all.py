"""Every benchmark in one run: writes benchmarks/RESULTS.md and the section reports (make bench).

Sections, each also written on its own (RESULTS-<section>.md, with its figures):
- obnlm: our OBNLM's speed against the previous kernel and a torch baseline, peak memory;
- despeckle: OBNLM and U-Net against scikit-image, SimpleITK and SRAD (quality, time, memory),
  and scaling with volume size and sequence length;
- unet: fidelity of unet-obnlm to OBNLM, against ground truth, the paper's Tables 1 and 2;
- registration: VoxelMorph and demons on held-out breathing sequences, the paper's Table 3.
RESULTS.md states the machine, versions and date, and holds every section in full.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

HERE = Path(__file__).resolve().parent
SECTIONS = ("obnlm", "despeckle", "unet", "registration")


def machine() -> str:
    import numba
    import skimage

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    from us3d import __version__
    return (f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPU cores, {memory:.0f} GiB memory, "
            f"GPU: {gpu}. Python {platform.python_version()}, us3d {__version__}, torch {torch.__version__}, numpy "
            f"{np.__version__}, numba {numba.__version__}, SimpleITK {sitk.Version.VersionString()}, scikit-image "
            f"{skimage.__version__}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="every section in its quick mode (under 5 minutes)")
    mode.add_argument("--tiny", action="store_true", help="a code-path check on tiny inputs (for the test suite)")
    parser.add_argument("--outdir", default=str(HERE), help="where to write the reports (default benchmarks/)")
    parser.add_argument("--sections", nargs="*", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections; RESULTS.md is assembled from every section's report, "
                             "each of which states when it was written (default: all; none: only reassemble "
                             "RESULTS.md, e.g. after one section's script was run on its own)")
    args = parser.parse_args(argv)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    flags = ["--quick"] if args.quick else ["--tiny"] if args.tiny else []
    start, seconds = time.perf_counter(), {}
    for section in args.sections:
        began = time.perf_counter()
        module = importlib.import_module(f"bench_{section}")
        module.main(flags + ["--output", str(outdir / f"RESULTS-{section}.md")])
        seconds[section] = time.perf_counter() - began
    total = time.perf_counter() - start
    mode_name = "quick mode" if args.quick else "tiny code-path check (figures meaningless)" if args.tiny else "full"
    rerun = "" if len(args.sections) == len(SECTIONS) else " --sections " + " ".join(args.sections)
    lines = [
        "# Benchmark results",
        "",
        (f"Written by `python benchmarks/run_all.py{' ' + flags[0] if flags else ''}{rerun}` ({mode_name}) on "
         f"{datetime.date.today().isoformat()} in {total / 60:.1f} min ("
         + ", ".join(f"{s} {seconds[s] / 60:.1f} min" for s in args.sections) + ")"
         + ("; the other sections are from earlier runs, each dated in its own heading line" if rerun else "") + "."
         ) if args.sections else (
        f"Assembled by `python benchmarks/run_all.py --sections` on {datetime.date.today().isoformat()} from the "
        "section reports, each from its own run, dated in its own heading line."),
        "",
        f"Machine: {machine()}",
        "",
        "Where the paper's tables are: Table 1 (SMPI) and Table 2 (run time) in the U-Net section, Table 3 "
        "(registration MSE) in the registration section, each with the paper's numbers beside ours.",
        "",
    ]
    for section in SECTIONS:
        text = (outdir / f"RESULTS-{section}.md").read_text()
        lines.append("\n".join("#" + line if line.startswith("#") else line for line in text.splitlines()))
        lines.append("")
    (outdir / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {outdir / 'RESULTS.md'} ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
