"""The `us3d` command line: despeckle, metrics, phantom, demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from us3d import __version__
from us3d.allocator import reuse_freed_memory
from us3d.errors import InputError

EXIT_USAGE = 2


class ProgressBar:
    """Frame counter on stderr: a redrawn bar on a terminal, one line per frame otherwise."""

    def __init__(self, label: str, stream=None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if total <= 1:
            return
        if self.tty:
            filled = int(30 * done / total)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} frames")
            if done == total:
                self.stream.write("\n")
        else:
            self.stream.write(f"{self.label}: frame {done}/{total}\n")
        self.stream.flush()


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _check_kind_matches(data, output: Path) -> None:
    from us3d.io import VolumeSequence, is_sequence_path

    if isinstance(data, VolumeSequence) and not is_sequence_path(output):
        raise InputError(f"the input is a 4D sequence: the output must end with .seq.nrrd, not {output.name}")
    if not isinstance(data, VolumeSequence) and is_sequence_path(output):
        raise InputError("the input is a 3D volume: the output must not be a .seq.nrrd sequence")


# --- despeckle -------------------------------------------------------------------------------

def cmd_despeckle(args: argparse.Namespace) -> int:
    import warnings

    import us3d
    from us3d.despeckling import FrameTimer, settings_from_arguments
    from us3d.devices import resolve_device
    from us3d.io import check_output_path

    output = check_output_path(args.output, args.input)
    report = Path(args.report) if args.report else None
    if report is not None:
        if report.suffix != ".json" or not report.parent.is_dir():
            raise InputError(f"--report must be a .json file in an existing folder, not {report}")
        if report.resolve() == Path(args.input).resolve():
            raise InputError(f"--report {report} is the input; choose another name")
    if args.method == "unet":
        from us3d.models.bundle import resolve_model

        resolve_model(args.model)  # an unknown model name fails before the input is read
        settings = settings_from_arguments("unet", model=args.model)
    else:
        settings = settings_from_arguments("obnlm", mode=args.mode, search_radius=args.search_radius,
                                           block_radius=args.block_radius, h=args.h)
    data = us3d.read(args.input)
    _check_kind_matches(data, output)
    device = resolve_device(args.device).type
    caught: list[str] = []

    def show(message, *rest) -> None:
        caught.append(str(message))
        print(f"us3d despeckle: warning: {message}", file=sys.stderr)

    from us3d.io import SequenceWriter, VolumeSequence, atomic_outputs, write_any

    timer = FrameTimer(ProgressBar("despeckle"))
    # The outputs appear only once every frame is done; a sequence's frames are written as they are
    # made (memory does not grow with the frame count).
    with atomic_outputs([output] + ([] if report is None else [report])) as temporaries:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            if isinstance(data, VolumeSequence):
                with SequenceWriter(temporaries[0], data) as writer:
                    us3d.despeckle(data, **settings.arguments(), device=args.device, progress=timer,
                                   on_frame=lambda t, frame: writer.write(frame))
            else:
                write_any(us3d.despeckle(data, **settings.arguments(), device=args.device, progress=timer),
                          temporaries[0])
        if report is not None:
            Path(temporaries[1]).write_text(json.dumps({
                "method": settings.description(), "device": device, "seconds_per_frame": timer.seconds_per_frame,
                "warnings": caught}, indent=1))
    frames = len(timer.seconds_per_frame)
    print(f"wrote {output} ({frames} frame{'s' if frames > 1 else ''}, {settings.description()}, "
          f"{np.median(timer.seconds_per_frame):.2f} s per frame on {device})")
    return 0


# --- models ----------------------------------------------------------------------------------

def cmd_models(args: argparse.Namespace) -> int:
    from us3d.models.bundle import MODELS_DIR, file_sha256, read_manifest

    entries = read_manifest()
    if not entries:
        print(f"no bundled models in {MODELS_DIR}")
        return 0
    for name, entry in sorted(entries.items()):
        path = MODELS_DIR / entry["file"]
        state = "ok" if path.is_file() and file_sha256(path) == entry["sha256"] else "MISSING OR CORRUPT"
        print(f"{name:16} {entry.get('task', 'despeckle'):12} target={entry['target']:6} {entry['file']} "
              f"sha256 {entry['sha256'][:12]}... {state}")
    return 0


# --- metrics ---------------------------------------------------------------------------------

def _frames(data) -> list[np.ndarray]:
    from us3d.io import VolumeSequence

    if isinstance(data, VolumeSequence):
        return [frame.astype(np.float64) for frame in data.frames]
    return [sitk.GetArrayFromImage(data).astype(np.float64)]


def frame_metrics(original: np.ndarray, filtered: np.ndarray | None, labels: np.ndarray | None,
                  region: int | None, versus: int | None, reference: np.ndarray | None) -> dict:
    """All metrics that the given inputs allow, for one frame."""
    from us3d import metrics

    target = filtered if filtered is not None else original
    values: dict[str, float] = {"enl": metrics.enl(target)}
    if filtered is not None:
        values["smpi"] = metrics.smpi(original, filtered)
        values["smpi_grey_levels"] = metrics.smpi_grey_levels(original, filtered)
        values["ssi"] = metrics.speckle_suppression_index(original, filtered)
    if labels is not None:
        a, b = labels == region, labels == versus
        for name, mask in (("region", a), ("versus", b)):
            if not mask.any():
                raise InputError(f"label {region if name == 'region' else versus} does not occur in the label map")
        values["cnr"] = metrics.cnr(target, a, b)
        values["gcnr"] = metrics.gcnr(target, a, b)
    if reference is not None:
        values["mse"] = metrics.mse(target, reference)
        values["psnr"] = metrics.psnr(target, reference)
        values["ssim"] = metrics.ssim(target, reference)
    return values


def cmd_metrics(args: argparse.Namespace) -> int:
    from us3d.io import read_volume_or_sequence

    original = _frames(read_volume_or_sequence(args.input))
    filtered = _frames(read_volume_or_sequence(args.output)) if args.output else None
    labels = _frames(read_volume_or_sequence(args.labels)) if args.labels else None
    reference = _frames(read_volume_or_sequence(args.reference)) if args.reference else None
    if labels is not None and (args.region is None or args.versus is None):
        raise InputError("--labels needs --region and --versus (the two label values to compare)")
    for name, other in (("output", filtered), ("labels", labels), ("reference", reference)):
        if other is not None and (len(other) != len(original) or other[0].shape != original[0].shape):
            raise InputError(f"the {name} does not match the input's frames and size")
    rows = []
    for index in range(len(original)):
        rows.append(frame_metrics(original[index], filtered[index] if filtered else None,
                                  labels[index] if labels else None, args.region, args.versus,
                                  reference[index] if reference else None))
    summary = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
    if args.json:
        print(json.dumps({"frames": rows, "mean": summary}, indent=2))
    else:
        names = list(rows[0])
        print("frame " + " ".join(f"{n:>9}" for n in names))
        for index, row in enumerate(rows):
            print(f"{index:>5} " + " ".join(f"{row[n]:9.4f}" for n in names))
        if len(rows) > 1:
            print(" mean " + " ".join(f"{summary[n]:9.4f}" for n in names))
    return 0


# --- output folders --------------------------------------------------------------------------

def _check_new_folder(folder: Path | None) -> None:
    """An output folder may exist or be new; its parent must exist (checked before any work)."""
    if folder is None:
        return
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} exists and is not a folder")
    if not folder.exists() and not folder.parent.is_dir():
        raise InputError(f"folder {folder.parent} does not exist")


@contextlib.contextmanager
def _created_folder(folder: Path | None):
    """Create `folder` if missing for the block; a failed block removes it again if it is left empty."""
    created = folder is not None and not folder.exists()
    if created:
        folder.mkdir()
    try:
        yield
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise


# --- phantom ---------------------------------------------------------------------------------

def cmd_phantom(args: argparse.Namespace) -> int:
    from us3d.io import check_output_path, is_sequence_path
    from us3d.phantom.export import write_phantom
    from us3d.phantom.varied import simulate_conditions

    output = check_output_path(args.output)
    if args.frame is not None:
        if is_sequence_path(output) or args.frames > 1:
            raise InputError("--frame writes one frame as a 3D volume: give a volume file name and no --frames")
    elif args.frames > 1 and not is_sequence_path(output):
        raise InputError(f"{args.frames} frames make a 4D sequence: the output must end with .seq.nrrd")
    truth = Path(args.truth_dir) if args.truth_dir else None
    _check_new_folder(truth)
    # with --frame, at least 2 frames: the scatterers then cover the breathing, as in every sequence of this seed
    frames = args.frames if args.frame is None else max(args.frame + 1, 2)
    phantom = simulate_conditions(args.conditions, frames, args.seed, progress=ProgressBar("phantom"))
    if args.frame is not None:
        import dataclasses

        keep = slice(args.frame, args.frame + 1)
        phantom = dataclasses.replace(phantom, bmode=phantom.bmode[keep], echogenicity=phantom.echogenicity[keep],
                                      labels=phantom.labels[keep], envelope=phantom.envelope[keep],
                                      displacement=phantom.displacement[keep])
    with _created_folder(truth):
        written = write_phantom(phantom, output, truth)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


# --- register --------------------------------------------------------------------------------

def cmd_register(args: argparse.Namespace) -> int:
    import us3d
    from us3d.io import atomic_outputs, check_output_path, read_volume, write_volume
    from us3d.registration.fields import write_field

    warped_path = check_output_path(args.warped, args.fixed, args.moving)
    outputs = [warped_path]
    if args.field:
        outputs.append(check_output_path(args.field, args.fixed, args.moving))
        if outputs[1] == warped_path:
            raise InputError("--field must name another file than the warped output")
    settings = _registration_settings(args)
    fixed, moving = read_volume(args.fixed), read_volume(args.moving)
    result = us3d.register(fixed, moving, **settings)
    with atomic_outputs(outputs) as temporaries:
        write_volume(result.warped, temporaries[0])
        if args.field:
            write_field(result.field, temporaries[1])
    if result.resampled:
        print("note: the moving volume was on another grid (size, spacing, origin or direction); "
              "it was resampled onto the fixed grid first")
    smpi = "" if result.smpi is None else f", SMPI of the despeckling {result.smpi:.3f}"
    print(f"MSE {result.mse_before:.5f} -> {result.mse_after:.5f} (intensities scaled to [0, 1]), "
          f"folding {100 * result.folding:.3f}% of voxels{smpi}, {result.seconds:.1f} s")
    print("wrote " + ", ".join(str(p) for p in outputs))
    return 0


# --- register-sequence -----------------------------------------------------------------------

METRIC_COLUMNS = ("frame", "index_value", "mse_before", "mse_after", "smpi", "folding_percent",
                  "endpoint_error_mean_mm", "endpoint_error_p95_mm", "seconds", "resampled")


class _FieldFiles:
    """True fields read from their files one at a time, when a frame asks for its own."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, t: int):
        from us3d.registration.fields import read_field

        return read_field(self.paths[t])


def cmd_register_sequence(args: argparse.Namespace) -> int:
    import csv
    import io

    import us3d
    from us3d.io import SequenceWriter, atomic_outputs, read_sequence
    from us3d.registration.fields import write_field

    outdir = Path(args.outdir)
    _check_new_folder(outdir)
    sequence = read_sequence(args.sequence)
    count = len(sequence)
    if args.moving_volume is not None:
        if args.moving_frame is not None:
            raise InputError("give --moving-frame or --moving-volume, not both")
        if args.truth_dir:
            raise InputError("--truth-dir needs --moving-frame 0 (the phantom's fields start from frame 0)")
        from us3d.io import read_volume

        moving = read_volume(args.moving_volume)
        described = Path(args.moving_volume).name
    else:
        args.moving_frame = 0 if args.moving_frame is None else args.moving_frame
        if not 0 <= args.moving_frame < count:
            raise InputError(f"--moving-frame must be between 0 and {count - 1} for this {count}-frame sequence")
        moving, described = args.moving_frame, f"frame {args.moving_frame}"
    truths = None
    if args.truth_dir:
        if args.moving_frame != 0:
            raise InputError("the phantom's true fields map frame 0 to each frame: use --moving-frame 0 "
                             "with --truth-dir")
        truth_paths = [Path(args.truth_dir) / f"displacement_{t:03d}.mha" for t in range(count)]
        missing = [str(p) for p in truth_paths if not p.is_file()]
        if missing:
            raise InputError(f"true field {missing[0]} not found (us3d phantom --truth-dir writes them)")
        truths = _FieldFiles(truth_paths)
    outputs = [outdir / "warped.seq.nrrd"] + [outdir / f"displacement_{t:03d}.mha" for t in range(count)]
    outputs.append(outdir / "metrics.csv")
    if Path(args.sequence).resolve() in {path.resolve() for path in outputs}:
        raise InputError(f"{args.sequence} would be overwritten by an output; choose another folder")
    settings = _registration_settings(args)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)

    def write_frame(t: int, result) -> None:
        """Frames stream through: each field and warped frame is written as soon as it is made, and
        the caller keeps only its figures, so memory does not grow with the frame count."""
        write_field(result.field, temporaries[1 + t])
        warped.write(sitk.GetArrayViewFromImage(result.warped))
        epe = result.endpoint_error or (float("nan"), float("nan"))
        writer.writerow([t, sequence.index_values[t], f"{result.mse_before:.6f}", f"{result.mse_after:.6f}",
                         "" if result.smpi is None else f"{result.smpi:.4f}", f"{100 * result.folding:.4f}",
                         "" if truths is None else f"{epe[0]:.4f}", "" if truths is None else f"{epe[1]:.4f}",
                         f"{result.seconds:.3f}", int(result.resampled)])

    # The outputs appear (and the folder stays) only once every frame is done.
    with _created_folder(outdir), atomic_outputs(outputs) as temporaries:
        with SequenceWriter(temporaries[0], sequence) as warped:
            results = us3d.register_sequence(sequence, moving, **settings, truths=truths,
                                             progress=ProgressBar("register"), on_frame=write_frame)
        Path(temporaries[-1]).write_text(table.getvalue())
    print(table.getvalue(), end="")
    others = [r for t, r in enumerate(results) if t != args.moving_frame] or results
    summary = (f"{described} registered to {count} frames with {args.method}: mean MSE "
               f"{np.mean([r.mse_before for r in others]):.5f} -> {np.mean([r.mse_after for r in others]):.5f}, "
               f"{np.median([r.seconds for r in results]):.2f} s per pair")
    if truths is not None:
        summary += f", mean endpoint error {np.mean([r.endpoint_error[0] for r in others]):.3f} mm"
    print(summary)
    print(f"wrote {outputs[0]}, {count} displacement fields and {outputs[-1]}")
    return 0


# --- train-despeckle and train-register ------------------------------------------------------

def _model_output(path: str) -> Path:
    """The .pt file a training run will write, checked before any work."""
    output = Path(path)
    if output.suffix != ".pt":
        raise InputError(f"the model file must end with .pt, not {output.name}")
    if not output.parent.is_dir():
        raise InputError(f"folder {output.parent} does not exist")
    return output


def _wrote_model(output: Path, start: float, written: bool) -> None:
    """The files a training run wrote (rank 0 only: `written`) and its wall time."""
    import time

    if written:
        print(f"wrote {output}, {output.with_suffix('.md')}, {output.with_suffix('.log.jsonl')} "
              f"({(time.perf_counter() - start) / 60:.1f} min)")


# --- train-despeckle ------------------------------------------------------------------------

def cmd_train_despeckle(args: argparse.Namespace) -> int:
    import time

    import torch

    from us3d.training.despeckle import TrainingSettings, train_despeckle_model

    output = _model_output(args.output)
    if args.crop[1] % 16 or args.crop[2] % 16:
        raise InputError("crop j and i must be multiples of 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainingSettings(args.steps, args.batch_size, tuple(args.crop), args.lr, args.seed)
    start = time.perf_counter()
    validation = train_despeckle_model(output, args.target, settings, args.standard, args.varied, not args.no_real,
                                       args.device, args.cache, args.threads)
    for row in validation:
        print(f"{row['volume']}: PSNR {row['psnr']:.2f} dB (input {row['psnr_identity']:.2f}), "
              f"SMPI {row['smpi_model']:.3f} vs target {row['smpi_target']:.3f}")
    _wrote_model(output, start, bool(validation))
    return 0


# --- train-register -------------------------------------------------------------------------

def cmd_train_register(args: argparse.Namespace) -> int:
    import time

    import torch

    from us3d.training import registration as training

    output = _model_output(args.output)
    if args.frames < 2:
        raise InputError("--frames must be at least 2 (an exhale frame and a frame to register to it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0 <= args.random_motion <= 1:
        raise InputError("--random-motion must lie between 0 and 1")
    settings = training.RegistrationTrainingSettings(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, smoothness_weight=args.smoothness,
        truth_weight=args.truth_weight, image_weight=args.image_weight, random_motion=args.random_motion,
        seed=args.seed)
    conditions = {"standard": training.TRAINING["standard"][:args.standard_sequences],
                  "varied": training.TRAINING["varied"][:args.varied_sequences]}
    start = time.perf_counter()
    validation = training.train_registration_model(output, settings, tuple(args.inputs), args.frames, args.device,
                                                   args.cache, {k: v for k, v in conditions.items() if v},
                                                   args.initial_weights)
    for row in validation:
        print(f"{row['preprocessing']}, {row['sequence']}: mean endpoint error {row['endpoint_error_mm']:.3f} mm "
              f"(rigid step alone {row['rigid_endpoint_error_mm']:.3f}), "
              f"MSE {row['mse_before']:.4f} -> {row['mse_after']:.4f}")
    _wrote_model(output, start, bool(validation))
    return 0


# --- demo ------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from us3d.demo import run_demo

    report = run_demo(Path(args.outdir), frames=args.frames, device=args.device, progress=ProgressBar("demo"))
    print(f"wrote {report}")
    return 0


def _registration_options(p: argparse.ArgumentParser) -> None:
    from us3d.options import DEFAULT_REFINE_STEPS, DEVICES, REGISTRATION_METHODS, REGISTRATION_PREPROCESSING

    p.add_argument("--method", choices=REGISTRATION_METHODS, default="voxelmorph",
                   help="voxelmorph: the bundled VoxelMorph network, then per-pair refinement; translation: an "
                        "FFT translation, then the same refinement (no network); demons: multi-resolution "
                        "SimpleITK demons (default voxelmorph)")
    p.add_argument("--refine-steps", type=_non_negative_int, default=DEFAULT_REFINE_STEPS,
                   help="Adam steps of per-pair refinement after the network or translation (after each depth "
                        "band's own translation where it matches better); 0 gives the pure "
                        f"network, as in the paper (default {DEFAULT_REFINE_STEPS})")
    p.add_argument("--preprocessing", "--despeckle", dest="preprocessing", choices=REGISTRATION_PREPROCESSING,
                   default="none", help="pre-process both volumes before registering: gaussian (sigma 1 voxel), "
                                        "OBNLM or the U-Net of --unet-model (default none)")
    p.add_argument("--unet-model", default="unet-obnlm",
                   help="U-Net model name or .pt file for --preprocessing unet (default unet-obnlm)")
    p.add_argument("--registration-model", help="VoxelMorph model name or .pt file (default: the bundled "
                                                "voxelmorph)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="compute device (default auto)")


def _registration_settings(args: argparse.Namespace) -> dict:
    """`us3d.register`'s keyword arguments from the command line, checked (unknown models included)
    before any volume is read."""
    from us3d.registration.pairs import RegistrationSettings

    if args.method != "voxelmorph" and args.registration_model:
        raise InputError(f"--registration-model is a VoxelMorph model; it does not apply to --method {args.method}")
    settings = RegistrationSettings(method=args.method, preprocessing=args.preprocessing,
                                    refine_steps=args.refine_steps, device=args.device,
                                    model=args.registration_model, unet_model=args.unet_model)
    settings.check()
    return settings.arguments()


def build_parser() -> argparse.ArgumentParser:
    from us3d.options import DEVICES as DEVICE_CHOICES
    from us3d.options import OBNLM_MODES
    from us3d.training.registration import TRAINING, RegistrationTrainingSettings

    parser = argparse.ArgumentParser(prog="us3d", description="Speckle reduction and analysis of 3D/4D ultrasound.")
    parser.add_argument("--version", action="version", version=f"us3d {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("despeckle", help="despeckle a 3D volume or every frame of a 4D .seq.nrrd sequence",
                       description="Despeckle a 3D volume or every frame of a 4D .seq.nrrd sequence with OBNLM or a trained 3D dense U-Net.")
    p.add_argument("input", help="volume (.nrrd .nhdr .nii .nii.gz .mha .mhd) or sequence (.seq.nrrd)")
    p.add_argument("output", help="output file (a new file; the input is never overwritten)")
    p.add_argument("--method", choices=("obnlm", "unet"), default="obnlm",
                   help="obnlm: the OBNLM filter; unet: a trained 3D dense U-Net (default: obnlm)")
    p.add_argument("--model", default="unet-obnlm",
                   help="U-Net model: a bundled name (see `us3d models`) or a .pt file (default unet-obnlm)")
    p.add_argument("--mode", choices=OBNLM_MODES, default="slicewise",
                   help="slicewise: each k-slice in 2D as the public OBNLM; 3d: 3D blocks and search")
    p.add_argument("--search-radius", type=_positive_int, default=3, metavar="M",
                   help="search radius M in voxels (default 3)")
    p.add_argument("--block-radius", type=_positive_int, default=1, metavar="A",
                   help="block radius alpha in voxels, >= 1 (default 1: 3x3 blocks)")
    p.add_argument("--h", type=_positive_float, default=0.7, help="smoothing parameter h (default 0.7)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="compute device (default auto)")
    p.add_argument("--report", help="also write a JSON file: method, device, seconds per frame, warnings")
    p.set_defaults(func=cmd_despeckle)

    p = sub.add_parser("models", help="list the bundled models and check their files",
                       description="List the bundled U-Net models (Resources/Models/manifest.json) and check "
                                   "each file's sha256.")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("metrics", help="speckle and image-quality metrics",
                       description="SMPI/SSI of OUTPUT vs INPUT, ENL, CNR/gCNR between two labels, "
                                   "MSE/PSNR/SSIM against a reference; per frame for sequences. SMPI is on the "
                                   "paper's scale (both volumes normalised by the input's mean and std); "
                                   "smpi_grey_levels is the same index with the mean shift in grey levels.")
    p.add_argument("input", help="original volume or sequence")
    p.add_argument("output", nargs="?", help="filtered volume or sequence (optional)")
    p.add_argument("--labels", help="label map (same grid) for CNR and gCNR")
    p.add_argument("--region", type=int, help="label value of the region of interest (e.g. a lesion)")
    p.add_argument("--versus", type=int, help="label value of the background region (e.g. parenchyma)")
    p.add_argument("--reference", help="reference volume for MSE, PSNR and SSIM (e.g. the clean phantom)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("phantom", help="simulate a 3D/4D B-mode liver phantom with ground truth",
                       description="Simulate a B-mode liver phantom (128x128x32 voxels, 0.4x0.3x0.8 mm) "
                                   "with breathing motion; frame 0 is the exhale frame.")
    p.add_argument("output", help="output volume, or .seq.nrrd for more than one frame")
    p.add_argument("--frames", type=_positive_int, default=1, help="number of frames (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed: anatomy, motion and speckle (default 0)")
    p.add_argument("--frame", type=_non_negative_int,
                   help="write only frame N of the breathing sequence, as a 3D volume (its true displacement from "
                        "frame 0 in the truth folder as displacement_000.mha)")
    p.add_argument("--conditions", choices=("standard", "varied", "sliding"), default="standard",
                   help="standard: the configuration above; varied: imaging (spacing, frequency, PSF, scatterer "
                        "density, dynamic range, gain, attenuation, sector) and breathing (5-20 mm, direction, "
                        "sliding wall or not) drawn from wide ranges, depth along i half of the time; sliding: 16 mm "
                        "breathing under a wall that does not follow the liver (default standard)")
    p.add_argument("--truth-dir", help="folder for the ground truth: clean echogenicity, labels, "
                                       "displacement fields (mm, ITK displacement field images)")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("register", help="deformable registration of a moving volume onto a fixed volume",
                       description="Register MOVING onto FIXED (VoxelMorph or demons), optionally despeckling "
                                   "both first; write the warped moving volume and, with --field, the displacement "
                                   "field (ITK displacement field: LPS, mm, on the fixed grid; Slicer loads it as "
                                   "a transform).")
    p.add_argument("fixed", help="fixed volume")
    p.add_argument("moving", help="moving volume (e.g. the exhale frame)")
    p.add_argument("warped", help="output: the moving volume warped onto the fixed grid")
    p.add_argument("--field", help="output: displacement field (.mha, .nrrd or .nii.gz)")
    _registration_options(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("register-sequence", help="register the exhale frame of a 4D sequence to every frame",
                       description="The paper's protocol: the reference (exhale) frame of SEQUENCE is registered to "
                                   "every frame. Writes OUTDIR/warped.seq.nrrd, one displacement field per frame "
                                   "(OUTDIR/displacement_NNN.mha: ITK displacement field, LPS, mm) and "
                                   "OUTDIR/metrics.csv (MSE before/after, SMPI, folding, endpoint error with "
                                   "--truth-dir, seconds).")
    p.add_argument("sequence", help="4D sequence (.seq.nrrd)")
    p.add_argument("outdir", help="output folder (created if missing)")
    p.add_argument("--moving-frame", "--reference-frame", dest="moving_frame", type=int,
                   help="the frame registered to every frame: the exhale frame, the paper's 'reference' (default 0)")
    p.add_argument("--moving-volume", help="a volume registered to every frame instead of a frame of the sequence "
                                           "(resampled onto the sequence's grid when it lies on another)")
    p.add_argument("--truth-dir", help="folder with the true fields displacement_NNN.mha (us3d phantom --truth-dir)")
    _registration_options(p)
    p.set_defaults(func=cmd_register_sequence)

    p = sub.add_parser("train-despeckle", help="train the 3D dense U-Net despeckler",
                       description="Train the 3D dense U-Net on simulated liver volumes (standard and varied imaging) "
                                   "and, for OBNLM, the real B-mode sources, to reproduce OBNLM or the clean echogenicity; writes OUTPUT.pt "
                                   "(TorchScript), OUTPUT.md (model card) and OUTPUT.log.jsonl. Under torchrun "
                                   "it trains data-parallel (DDP).")
    p.add_argument("output", help="model file to write (.pt); inside Resources/Models the manifest is updated")
    p.add_argument("--target", choices=("obnlm", "clean"), default="obnlm",
                   help="obnlm: the project's default OBNLM output; clean: the simulator's speckle-free truth")
    p.add_argument("--standard", type=_non_negative_int, default=8,
                   help="simulated training volumes of the standard configuration (default 8)")
    p.add_argument("--varied", type=_non_negative_int, default=48,
                   help="simulated training volumes with imaging drawn from wide ranges (default 48)")
    p.add_argument("--no-real", action="store_true", help="leave out the real B-mode sources (OBNLM target)")
    p.add_argument("--steps", type=_positive_int, default=3000, help="optimiser steps (default 3000)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="crops per step (default 4)")
    p.add_argument("--crop", type=_positive_int, nargs=3, default=(16, 64, 64), metavar=("K", "J", "I"),
                   help="crop size in voxels (default 16 64 64; J and I multiples of 16)")
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--cache", help="folder to cache simulated volumes and held-out OBNLM targets")
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's choice)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="compute device (default auto)")
    p.set_defaults(func=cmd_train_despeckle)

    p = sub.add_parser("train-register", help="train VoxelMorph on simulated breathing sequences",
                       description="Train VoxelMorph on simulated 4D breathing sequences: the exhale frame 0 is "
                                   "registered to every other frame. Writes OUTPUT.pt (TorchScript), OUTPUT.md "
                                   "(model card) and OUTPUT.log.jsonl. Under torchrun it trains data-parallel (DDP).")
    p.add_argument("output", help="model file to write (.pt); inside Resources/Models the manifest is updated")
    p.add_argument("--inputs", nargs="+", choices=("none", "obnlm", "unet"), default=["none", "obnlm", "unet"],
                   help="pre-processings of the frames the model learns, as they will be at inference "
                        "(default: all three)")
    p.add_argument("--standard-sequences", type=_non_negative_int, default=len(TRAINING["standard"]),
                   help=f"training sequences of the standard simulator configuration (at most "
                        f"{len(TRAINING['standard'])}, the default)")
    p.add_argument("--varied-sequences", type=_non_negative_int, default=len(TRAINING["varied"]),
                   help=f"training sequences with varied imaging and breathing (at most {len(TRAINING['varied'])}, "
                        "the default)")
    p.add_argument("--frames", type=_positive_int, default=8, help="frames per sequence (default 8)")
    p.add_argument("--steps", type=_positive_int, default=RegistrationTrainingSettings.steps,
                   help=f"optimiser steps (default {RegistrationTrainingSettings.steps})")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="pairs per step (default 1)")
    p.add_argument("--lr", type=_positive_float, default=RegistrationTrainingSettings.learning_rate,
                   help=f"Adam learning rate (default {RegistrationTrainingSettings.learning_rate})")
    p.add_argument("--smoothness", type=float, default=RegistrationTrainingSettings.smoothness_weight,
                   help="weight of the squared displacement gradient, mm/mm "
                        f"(default {RegistrationTrainingSettings.smoothness_weight})")
    p.add_argument("--truth-weight", type=float, default=RegistrationTrainingSettings.truth_weight,
                   help="weight (per mm) of the endpoint error against the simulator's true motion; "
                        f"0 gives the paper's unsupervised loss (default {RegistrationTrainingSettings.truth_weight})")
    p.add_argument("--image-weight", type=float, default=RegistrationTrainingSettings.image_weight,
                   help="weight of the MSE of normalised fixed and warped moving volumes (the paper's loss; "
                        f"default {RegistrationTrainingSettings.image_weight})")
    p.add_argument("--random-motion", type=float, default=RegistrationTrainingSettings.random_motion,
                   help="share of the training pairs made by warping a training frame with a random smooth field "
                        f"(us3d.training.random_motion; default {RegistrationTrainingSettings.random_motion})")
    p.add_argument("--initial-weights", metavar="MODEL",
                   help="start from this registration model's weights (a model file or bundled name): fine-tuning")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--cache", help="folder to cache simulated, pre-processed sequences")
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's choice)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="compute device (default auto)")
    p.set_defaults(func=cmd_train_register)

    p = sub.add_parser("demo", help="run the main job end to end and write a report",
                       description="Simulated 4D liver sequence and a real 3D volume -> OBNLM -> metrics -> "
                                   "report.md with side-by-side views.")
    p.add_argument("outdir", help="output folder (created if missing)")
    p.add_argument("--frames", type=_positive_int, default=4, help="frames of the simulated sequence (default 4)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="compute device (default auto)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reuse_freed_memory()  # large frames: no page faults for every fresh tensor (see its docstring)
    try:
        return args.func(args)
    except InputError as error:
        print(f"us3d {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"us3d {args.command}: cancelled; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
