"""Throughput on one compute device: writes benchmarks/RESULTS-device-<cpu|cuda>.md.

What issue 15 asks to measure where a GPU is at hand, and the same rows on the CPU for comparison:
- the U-Net (`unet-obnlm`) per frame by batch size and precision (float32, bfloat16) at 128x128x32,
  and per frame at 256x256x128 (a scan-converted 4D liver frame), with the PSNR of bfloat16
  against float32 (grey levels, the float32 output's range as peak);
- the VoxelMorph network per pair, and with the default per-pair refinement, at both sizes;
- OBNLM per frame (slice-wise M=3 alpha=1, the default, and M=7 alpha=3; 3d M=5 alpha=1) on the
  device's own path (the torch path on CUDA, the compiled CPU kernel on the CPU).

Timings are medians of repeated runs after two warm-up runs, with CUDA synchronised; frames are simulated
(standard configuration for 128x128x32; 0.2x0.15x0.2 mm voxels for 256x256x128). It imports torch,
numpy and us3d's torch-only modules (no SimpleITK), so it runs on a bare GPU machine with the
repository on PYTHONPATH::

    python benchmarks/bench_device.py                  # CUDA when present, else the CPU
    python benchmarks/bench_device.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from us3d import __version__
from us3d.filters import obnlm
from us3d.models.bundle import load_model
from us3d.models.inference import predict
from us3d.models.unet import for_inference, native_bfloat16
from us3d.phantom import simulate_sequence
from us3d.phantom.speckle import ImagingSetup
from us3d.registration.refine import RefinementSettings, refine

SMALL = ImagingSetup()  # 128x128x32, the project's standard configuration
LARGE = ImagingSetup(shape=(128, 256, 256), spacing=(0.2, 0.15, 0.2))


def _timed(function: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after two warm-up calls, CUDA synchronised."""
    def once() -> float:
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    once()
    once()  # TorchScript's profiling executor optimises a graph on its second call
    return statistics.median(once() for _ in range(repeats))


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process)"


def _psnr(reference: np.ndarray, test: np.ndarray) -> float:
    peak = float(reference.max() - reference.min())
    error = float(np.sqrt(np.mean((reference.astype(np.float64) - test) ** 2)))
    return float("inf") if error == 0 else 20 * np.log10(peak / error)


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 convolutions have a fast kernel here (on CPUs without native bfloat16, AVX-512 BF16 or
    AMX, they are emulated or fall back to a reference kernel, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return native_bfloat16()


def unet_module(model, device: torch.device, precision: str) -> torch.nn.Module:
    """The U-Net as us3d runs it on `device` in `precision`: on the CPU rebuilt with oneDNN convolutions
    (`unet.for_inference`, what `us3d.despeckle` runs), on CUDA the model file's module, cast."""
    if device.type == "cpu":
        return for_inference(model.module, bfloat16=precision == "bfloat16")
    return model.module if precision == "float32" else load_model("unet-obnlm", device).module.to(torch.bfloat16)


def unet_rows(device: torch.device, small: np.ndarray, large: np.ndarray, repeats: int) -> list[str]:
    model = load_model("unet-obnlm", device)
    mapping = model.input_mapping
    rows = []
    batches = (1, 4, 8) if device.type == "cuda" else (1, 2)
    precisions = ["float32"] + (["bfloat16"] if bf16_supported(device) else [])
    reference = {}
    for precision in precisions:
        module = unet_module(model, device, precision)  # predict feeds frames in its parameters' precision
        for batch in batches:
            def run(frames=small, batch=batch, module=module):
                return predict(module, frames, device, batch_frames=batch, mapping=mapping)
            _peak_reset(device)
            seconds = _timed(run, device, repeats) / len(small)
            output = run()
            if precision == "float32" and batch == 1:
                reference["small"] = output
            fidelity = "" if precision == "float32" else f"{_psnr(reference['small'], output):.1f} dB"
            rows.append(f"| U-Net | {small.shape[1]}x{small.shape[2]}x{small.shape[3]} | {batch} | {precision} | "
                        f"{seconds * 1e3:.1f} ms per frame | {fidelity} | {_peak(device)} |")
        def run_large(module=module):
            return predict(module, large[:1], device, batch_frames=1, mapping=mapping)
        _peak_reset(device)
        seconds = _timed(run_large, device, max(1, repeats // 2))
        output = run_large()
        if precision == "float32":
            reference["large"] = output
        fidelity = "" if precision == "float32" else f"{_psnr(reference['large'], output):.1f} dB"
        rows.append(f"| U-Net | {large.shape[1]}x{large.shape[2]}x{large.shape[3]} | 1 | {precision} | "
                    f"{seconds:.3f} s per frame | {fidelity} | {_peak(device)} |")
    if device.type == "cuda":  # the same with cuDNN's autotuner (torch.backends.cudnn.benchmark)
        frames16 = np.concatenate([small, small])[:16]
        torch.backends.cudnn.benchmark = True
        try:
            for precision in precisions:
                module = unet_module(model, device, precision)
                for batch in (8, 16):
                    def run(batch=batch, module=module):
                        return predict(module, frames16, device, batch_frames=batch, mapping=mapping)
                    _peak_reset(device)
                    seconds = _timed(run, device, repeats) / len(frames16)
                    fidelity = "" if precision == "float32" else f"{_psnr(reference['small'], run()[:len(small)]):.1f} dB"
                    rows.append(f"| U-Net, cuDNN autotuned | {small.shape[1]}x{small.shape[2]}x{small.shape[3]} | "
                                f"{batch} | {precision} | {seconds * 1e3:.1f} ms per frame | {fidelity} | "
                                f"{_peak(device)} |")
        finally:
            torch.backends.cudnn.benchmark = False
    if not bf16_supported(device):  # time it on a small crop only: the fallback kernel is slow
        crop = np.ascontiguousarray(small[:1, :8, :64, :64])
        module = load_model("unet-obnlm", device).module.to(torch.bfloat16)
        full = _timed(lambda: predict(model.module, crop, device, mapping=mapping), device, 1)
        half = _timed(lambda: predict(module, crop, device, mapping=mapping), device, 1)
        rows.append(f"| U-Net | 8x64x64 | 1 | bfloat16 | {half:.2f} s per frame, {half / full:.0f}x float32's "
                    f"{full * 1e3:.0f} ms: no bfloat16 convolution kernel on this {device.type.upper()} (torch "
                    f"reports CPU capability {torch.backends.cpu.get_cpu_capability()}), not used | | |")
    return rows


def registration_rows(device: torch.device, pairs: dict[str, tuple[np.ndarray, np.ndarray, tuple]],
                      repeats: int) -> list[str]:
    network = load_model("voxelmorph", device).module
    rows = []
    for size, (fixed, moving, spacing) in pairs.items():
        f = torch.from_numpy(fixed.astype(np.float32))[None, None].to(device)
        m = torch.from_numpy(moving.astype(np.float32))[None, None].to(device)

        def run_network():
            with torch.inference_mode():
                return network(f, m)

        def run_refined():
            start = run_network().clone()
            with torch.enable_grad():
                return refine(f, m, start, spacing, RefinementSettings())
        for name, run in (("network", run_network), (f"network + {RefinementSettings().steps} refinement steps",
                                                     run_refined)):
            _peak_reset(device)
            seconds = _timed(run, device, repeats)
            rows.append(f"| VoxelMorph {name} | {size} | 1 pair | float32 | {seconds:.3f} s per pair | | "
                        f"{_peak(device)} |")
    return rows


def obnlm_rows(device: torch.device, small: np.ndarray, large: np.ndarray, repeats: int) -> list[str]:
    rows = []
    cases = [("slicewise", 3, 1, small[0]), ("slicewise", 7, 3, small[0]), ("3d", 5, 1, small[0]),
             ("slicewise", 3, 1, large[0])]
    for mode, search, block, volume in cases:
        _peak_reset(device)
        seconds = _timed(lambda: obnlm(volume, mode, search, block, 0.7, device.type), device,
                         max(1, repeats // (4 if volume.size > small[0].size else 1)))
        size = "x".join(map(str, volume.shape))
        rows.append(f"| OBNLM {mode} M={search} alpha={block} | {size} | 1 | float32 | {seconds:.3f} s per frame | "
                    f"| {_peak(device)} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="one timed run per row, 4 frames")
    parser.add_argument("--tiny", action="store_true", help="a code-path check on tiny volumes (for the test suite)")
    parser.add_argument("--sections", nargs="+", choices=("unet", "registration", "obnlm"),
                        default=["unet", "registration", "obnlm"])
    parser.add_argument("--output", help="report path (default benchmarks/RESULTS-device-<cpu|cuda>.md)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    output = Path(args.output or Path(__file__).with_name(f"RESULTS-device-{device.type}.md"))
    repeats = 1 if args.tiny or args.quick else 5
    small_setup, large_setup = SMALL, LARGE
    if args.tiny:
        small_setup = ImagingSetup(shape=(8, 32, 32))
        large_setup = ImagingSetup(shape=(16, 48, 48), spacing=(0.2, 0.15, 0.2))
    frames = 2 if args.tiny else 4 if args.quick else 8
    small_sequence = simulate_sequence(frames, 9901, small_setup)
    large_sequence = simulate_sequence(2, 9902, large_setup)
    small, large = small_sequence.bmode, large_sequence.bmode

    def kji(setup: ImagingSetup) -> tuple[float, float, float]:
        return (setup.spacing[2], setup.spacing[1], setup.spacing[0])
    pairs = {"x".join(map(str, small.shape[1:])): (small[-1], small[0], kji(small_setup)),
             "x".join(map(str, large.shape[1:])): (large[1], large[0], kji(large_setup))}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    threads = torch.get_num_threads()
    rows = []
    if "unet" in args.sections:
        rows += unet_rows(device, small, large, repeats)
    if "registration" in args.sections:
        rows += registration_rows(device, pairs, repeats)
    if "obnlm" in args.sections:
        rows += obnlm_rows(device, small, large, repeats)
    lines = [f"# Throughput on {device.type.upper()}: {name}", "",
             f"`python benchmarks/bench_device.py{' --quick' if args.quick else ''}{' --tiny' if args.tiny else ''}"
             f" --device {device.type}{'' if len(args.sections) == 3 else ' --sections ' + ' '.join(args.sections)}`, us3d {__version__}, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}; {threads} CPU threads. Medians of {repeats} timed run(s) after two "
             "warm-up runs, CUDA synchronised; simulated frames. Peak memory: since the row began on CUDA, the "
             "process's peak so far on the CPU.", "",
             "| job | frame (k x j x i) | batch | precision | time | PSNR vs float32 | peak memory |",
             "|---|---|---|---|---|---|---|"] + rows
    output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
