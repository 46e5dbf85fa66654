"""Registration of volume nodes and sequences in a MRML scene (the USRegistration module's work).

Fixed: a volume, or every frame of a sequence (the paper's protocol, with the moving volume
being the exhale/reference frame). Outputs: the warped moving volume (or a warped sequence) and
the displacement as grid transform nodes (a sequence of them for 4D), all created only after
every frame is done, so a cancelled or failed run adds nothing. Inputs are never changed.

Two ways to run: in this process (`register_volume_nodes`, `register_sequence_node`), or in a child
process that leaves Slicer's GUI free (`start_registration`, then `finish_registration`).
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

import us3d
from us3d.errors import InputError
from us3d.io import VolumeSequence, write_any
from us3d.registration.fields import read_field
from us3d.registration.pairs import PairResult, RegistrationSettings
from us3dmrml.background import BackgroundRun, new_folder
from us3dmrml.nodes import image_from_volume_node, new_sequence_node, new_volume_node, sequence_from_sequence_node
from us3dmrml.transforms import grid_transform_sequence, new_grid_transform_node


@dataclasses.dataclass
class RegistrationRun:
    """New nodes and, per fixed frame, what the panel shows."""

    warped_node: object  # volume node, or sequence node for 4D
    transform_node: object  # grid transform node, or sequence node of them for 4D
    results: list[PairResult]


def _pair_outputs(scene, fixed_node, moving_node, result: PairResult) -> RegistrationRun:
    name = f"{moving_node.GetName()} to {fixed_node.GetName()}"
    warped = new_volume_node(scene, result.warped, f"{name} warped")
    transform = new_grid_transform_node(scene, result.field, f"{name} displacement")
    return RegistrationRun(warped, transform, [result])


def _sequence_outputs(scene, fixed_sequence, moving_node, results: list[PairResult], browser_node,
                      sequences_logic) -> RegistrationRun:
    values = [fixed_sequence.GetNthIndexValue(n) for n in range(fixed_sequence.GetNumberOfDataNodes())]
    name = f"{moving_node.GetName()} to {fixed_sequence.GetName()}"
    warped_frames = VolumeSequence.from_images([r.warped for r in results], values, fixed_sequence.GetIndexName(),
                                               fixed_sequence.GetIndexUnit(), fixed_sequence.GetIndexTypeAsString())
    transforms = grid_transform_sequence(scene, [r.field for r in results], values, f"{name} displacement",
                                         fixed_sequence.GetIndexName(), fixed_sequence.GetIndexUnit(),
                                         fixed_sequence.GetIndexTypeAsString())
    warped = new_sequence_node(scene, warped_frames, f"{name} warped")  # into the scene only now that all is made
    scene.AddNode(transforms)
    if browser_node is not None:
        for sequence in (warped, transforms):
            browser_node.AddSynchronizedSequenceNodeID(sequence.GetID())
        if sequences_logic is not None:
            sequences_logic.UpdateProxyNodesFromSequences(browser_node)
    return RegistrationRun(warped, transforms, results)


def register_volume_nodes(scene, fixed_node, moving_node, settings: RegistrationSettings = RegistrationSettings(),
                          cancel: Callable[[], bool] | None = None) -> RegistrationRun:
    """Warp `moving_node` onto `fixed_node` (in this process): a new warped volume and a new grid
    transform node (placing the moving volume under that transform shows the same warped volume)."""
    fixed, moving = image_from_volume_node(fixed_node), image_from_volume_node(moving_node)
    return _pair_outputs(scene, fixed_node, moving_node,
                         us3d.register(fixed, moving, **settings.arguments(), cancel=cancel))


def register_sequence_node(scene, fixed_sequence, moving_node, settings: RegistrationSettings = RegistrationSettings(),
                           progress: Callable[[int, int], None] | None = None,
                           cancel: Callable[[], bool] | None = None, browser_node=None,
                           sequences_logic=None) -> RegistrationRun:
    """Warp `moving_node` onto every frame of `fixed_sequence` (`us3d.register_sequence`, in this
    process): a warped sequence and a sequence of grid transforms with the fixed sequence's index
    values (added to `browser_node`)."""
    if fixed_sequence is None or fixed_sequence.GetNumberOfDataNodes() == 0:
        raise InputError("the fixed sequence has no frames")
    frames = sequence_from_sequence_node(fixed_sequence)
    results = us3d.register_sequence(frames, image_from_volume_node(moving_node), **settings.arguments(),
                                     progress=progress, cancel=cancel)
    return _sequence_outputs(scene, fixed_sequence, moving_node, results, browser_node, sequences_logic)


@dataclasses.dataclass
class RegistrationJob:
    """A registration in a child process (`start_registration`), finished by `finish_registration`."""

    run: BackgroundRun
    fixed_node: object  # a volume node, or a sequence node for 4D
    moving_node: object
    fixed: VolumeSequence  # the fixed volume(s) as a sequence (one frame for a volume)
    outdir: Path
    sequence: bool
    browser: object = None


def _settings_arguments(settings: RegistrationSettings) -> list[str]:
    arguments = ["--method", settings.method, "--preprocessing", settings.preprocessing, "--refine-steps",
                 str(settings.refine_steps), "--device", settings.device, "--unet-model", settings.unet_model]
    return arguments + (["--registration-model", settings.model] if settings.model else [])


def start_registration(fixed_node, moving_node, settings: RegistrationSettings = RegistrationSettings(),
                       sequence: bool = False, python: str | None = None, browser_node=None) -> RegistrationJob:
    """Start registering `moving_node` to `fixed_node` (a volume, or with `sequence` every frame of a
    sequence node, whose outputs will join `browser_node`) in a child process running
    `us3d register-sequence --moving-volume` on temporary files; poll `job.run`, then call
    `finish_registration`."""
    if sequence:
        if fixed_node is None or fixed_node.GetNumberOfDataNodes() == 0:
            raise InputError("the fixed sequence has no frames")
        fixed = sequence_from_sequence_node(fixed_node)
    else:
        image = image_from_volume_node(fixed_node)
        fixed = VolumeSequence(sitk.GetArrayFromImage(image)[None], image.GetSpacing(), image.GetOrigin(),
                               np.reshape(image.GetDirection(), (3, 3)))
    moving = image_from_volume_node(moving_node)
    folder = new_folder()
    try:
        write_any(fixed, folder / "fixed.seq.nrrd")
        write_any(moving, folder / "moving.nrrd")
        run = BackgroundRun(["register-sequence", "fixed.seq.nrrd", "registered", "--moving-volume", "moving.nrrd"]
                            + _settings_arguments(settings), folder, python)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return RegistrationJob(run, fixed_node, moving_node, fixed, folder / "registered", sequence, browser_node)


def _read_results(job: RegistrationJob) -> list[PairResult]:
    warped = us3d.read(job.outdir / "warped.seq.nrrd")
    with open(job.outdir / "metrics.csv") as table:
        rows = list(csv.DictReader(table))
    results = []
    for t, row in enumerate(rows):
        smpi = float(row["smpi"]) if row["smpi"] else None
        results.append(PairResult(read_field(job.outdir / f"displacement_{t:03d}.mha"), warped.frame_image(t),
                                  float(row["mse_before"]), float(row["mse_after"]), smpi,
                                  float(row["folding_percent"]) / 100, float(row["seconds"]),
                                  resampled=row["resampled"] == "1"))
    return results


def finish_registration(scene, job: RegistrationJob, sequences_logic=None) -> RegistrationRun:
    """The finished job's outputs as new nodes (as the in-process functions make them); raises
    InputError with the worker's message if it failed. The temporary folder is removed either way."""
    job.run.check()
    try:
        results = _read_results(job)
        if job.sequence:
            return _sequence_outputs(scene, job.fixed_node, job.moving_node, results, job.browser, sequences_logic)
        return _pair_outputs(scene, job.fixed_node, job.moving_node, results[0])
    finally:
        job.run.close()
