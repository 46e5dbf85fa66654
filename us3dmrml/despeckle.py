"""Despeckling of volume nodes and sequences in a MRML scene, with progress and cancel.

The output is a new node (a new sequence, for 4D input, added to the input's browser so that
frames stay in step); the input node is never changed. A cancelled or failed run adds
nothing to the scene: outputs are created only after every frame is done.

Two ways to run: in this process (`despeckle_volume_node`, `despeckle_sequence_node`), or in a
child process that leaves Slicer's GUI free (`start_despeckle`, then `finish_despeckle` once
`job.run.poll()` says it is done; `job.run.cancel()` stops it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

import us3d
from us3d import metrics
from us3d.despeckling import FrameTimer, ObnlmSettings, UnetSettings
from us3d.devices import resolve_device
from us3d.io import VolumeSequence, write_any
from us3dmrml.background import BackgroundRun, new_folder
from us3dmrml.nodes import image_from_volume_node, new_sequence_node, new_volume_node, sequence_from_sequence_node


@dataclasses.dataclass
class DespeckleRun:
    """The new output node and what the panel shows: SMPI and run time per frame, the device."""

    output_node: object
    smpi: list[float]
    seconds_per_frame: list[float]
    device: str
    method: str
    warnings: list[str] = dataclasses.field(default_factory=list)  # e.g. CUDA out of memory, fell back


def _smpi(original: np.ndarray, filtered: np.ndarray) -> float:
    try:
        return metrics.smpi(original.astype(np.float64), filtered.astype(np.float64))
    except ValueError:  # a constant frame has no SMPI
        return float("nan")


def _despeckle_noting_warnings(data, settings, device, progress, cancel):
    """`us3d.despeckle`: (output, seconds per frame, device, its warnings (e.g. a CUDA fallback)) for the panel."""
    timer = FrameTimer(progress)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = us3d.despeckle(data, **settings.arguments(), device=device, progress=timer, cancel=cancel)
    return output, timer.seconds_per_frame, resolve_device(device).type, [str(warning.message) for warning in caught]


def _volume_run(scene, input_node, image: sitk.Image, output: sitk.Image, seconds: list[float], device: str,
                settings, caught: list[str], output_name: str | None) -> DespeckleRun:
    name = output_name or f"{input_node.GetName()} {settings.description().split()[0]}"
    node = new_volume_node(scene, output, name)
    smpi = _smpi(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(output))
    return DespeckleRun(node, [smpi], seconds, device, settings.description(), caught)


def _sequence_run(scene, sequence_node, sequence: VolumeSequence, output: VolumeSequence, seconds: list[float],
                  device: str, settings, caught: list[str], browser_node, sequences_logic,
                  output_name: str | None) -> DespeckleRun:
    name = output_name or f"{sequence_node.GetName()} {settings.description().split()[0]}"
    node = new_sequence_node(scene, output, name)
    if browser_node is not None:
        browser_node.AddSynchronizedSequenceNodeID(node.GetID())
        if sequences_logic is not None:
            sequences_logic.UpdateProxyNodesFromSequences(browser_node)
            proxy = browser_node.GetProxyNode(node)
            if proxy is not None:
                proxy.SetName(scene.GenerateUniqueName(name))
                proxy.CreateDefaultDisplayNodes()
    smpi = [_smpi(a, b) for a, b in zip(sequence.frames, output.frames)]
    return DespeckleRun(node, smpi, seconds, device, settings.description(), caught)


def despeckle_volume_node(scene, input_node, settings: ObnlmSettings | UnetSettings, device: str = "auto",
                          progress: Callable[[int, int], None] | None = None,
                          cancel: Callable[[], bool] | None = None, output_name: str | None = None) -> DespeckleRun:
    """Despeckle a scalar volume node into a new volume node with the same geometry (in this process)."""
    image = image_from_volume_node(input_node)
    output, seconds, used, caught = _despeckle_noting_warnings(image, settings, device, progress, cancel)
    return _volume_run(scene, input_node, image, output, seconds, used, settings, caught, output_name)


def despeckle_sequence_node(scene, sequence_node, settings: ObnlmSettings | UnetSettings, device: str = "auto",
                            progress: Callable[[int, int], None] | None = None,
                            cancel: Callable[[], bool] | None = None, browser_node=None, sequences_logic=None,
                            output_name: str | None = None) -> DespeckleRun:
    """Despeckle every frame of a volume sequence into a new sequence with the same index values (in
    this process).

    With `browser_node`, the new sequence is added to that browser (and, with `sequences_logic`,
    its proxy volume node is created at once) so both play in step.
    """
    sequence = sequence_from_sequence_node(sequence_node)
    output, seconds, used, caught = _despeckle_noting_warnings(sequence, settings, device, progress, cancel)
    return _sequence_run(scene, sequence_node, sequence, output, seconds, used, settings, caught, browser_node,
                         sequences_logic, output_name)


@dataclasses.dataclass
class DespeckleJob:
    """A despeckling run in a child process (`start_despeckle`), finished by `finish_despeckle`."""

    run: BackgroundRun
    node: object  # the input volume node, or the sequence node for 4D
    data: sitk.Image | VolumeSequence  # its voxels, for SMPI
    settings: ObnlmSettings | UnetSettings
    output: Path
    report: Path
    browser: object = None  # for a sequence: the browser its output joins (see finish_despeckle)


def _settings_arguments(settings: ObnlmSettings | UnetSettings) -> list[str]:
    if isinstance(settings, UnetSettings):
        return ["--method", "unet", "--model", settings.model]
    return ["--method", "obnlm", "--mode", settings.mode, "--search-radius", str(settings.search_radius),
            "--block-radius", str(settings.block_radius), "--h", repr(float(settings.h))]


def start_despeckle(node, settings: ObnlmSettings | UnetSettings, device: str = "auto", sequence: bool = False,
                    python: str | None = None, browser_node=None) -> DespeckleJob:
    """Start despeckling a volume node (or, with `sequence`, a sequence node, whose output will join
    `browser_node`) in a child process running `us3d despeckle` on temporary files; poll `job.run`,
    then call `finish_despeckle`."""
    data = sequence_from_sequence_node(node) if sequence else image_from_volume_node(node)
    folder = new_folder()
    try:
        suffix = ".seq.nrrd" if sequence else ".nrrd"
        source, output, report = folder / f"input{suffix}", folder / f"output{suffix}", folder / "report.json"
        write_any(data, source)
        run = BackgroundRun(["despeckle", source.name, output.name, "--report", report.name, "--device", device]
                            + _settings_arguments(settings), folder, python)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return DespeckleJob(run, node, data, settings, output, report, browser_node)


def finish_despeckle(scene, job: DespeckleJob, sequences_logic=None, output_name: str | None = None) -> DespeckleRun:
    """The finished job's output as new nodes (as the in-process functions make them; a sequence joins
    `job.browser`); raises InputError with the worker's message if it failed. The temporary folder
    is removed either way."""
    job.run.check()
    try:
        report = json.loads(job.report.read_text())
        output = us3d.read(job.output)
        args = (report["seconds_per_frame"], report["device"], job.settings, report["warnings"])
        if isinstance(job.data, VolumeSequence):
            return _sequence_run(scene, job.node, job.data, output, *args, job.browser, sequences_logic, output_name)
        return _volume_run(scene, job.node, job.data, output, *args, output_name)
    finally:
        job.run.close()
