"""Despeckling of volume nodes and sequences in a MRML scene, with progress and cancel.

The output is a new node (a new sequence, for 4D input, added to the input's browser so that
frames stay in step); the input node is never changed. A cancelled or failed run adds
nothing to the scene: outputs are created only after every frame is done.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import numpy as np
import SimpleITK as sitk

from us3d import metrics
from us3d.despeckling import ObnlmSettings, UnetSettings, despeckle
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


def describe(settings: ObnlmSettings | UnetSettings) -> str:
    if isinstance(settings, UnetSettings):
        return f"U-Net {settings.model}"
    return f"OBNLM {settings.mode} M={settings.search_radius} a={settings.block_radius} h={settings.h:g}"


def _smpi(original: np.ndarray, filtered: np.ndarray) -> float:
    try:
        return metrics.smpi(original.astype(np.float64), filtered.astype(np.float64))
    except ValueError:  # a constant frame has no SMPI
        return float("nan")


def _despeckle_noting_warnings(data, settings, device, progress, cancel):
    """us3d's despeckle, with its warnings (e.g. a CUDA fallback) returned for the panel."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = despeckle(data, settings, device, progress, cancel)
    return result, [str(warning.message) for warning in caught]


def despeckle_volume_node(scene, input_node, settings: ObnlmSettings | UnetSettings, device: str = "auto",
                          progress: Callable[[int, int], None] | None = None,
                          cancel: Callable[[], bool] | None = None, output_name: str | None = None) -> DespeckleRun:
    """Despeckle a scalar volume node into a new volume node with the same geometry."""
    image = image_from_volume_node(input_node)
    result, caught = _despeckle_noting_warnings(image, settings, device, progress, cancel)
    name = output_name or f"{input_node.GetName()} {describe(settings).split()[0]}"
    node = new_volume_node(scene, result.output, name)
    smpi = _smpi(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(result.output))
    return DespeckleRun(node, [smpi], result.seconds_per_frame, result.device, describe(settings),
                        caught)


def despeckle_sequence_node(scene, sequence_node, settings: ObnlmSettings | UnetSettings, device: str = "auto",
                            progress: Callable[[int, int], None] | None = None,
                            cancel: Callable[[], bool] | None = None, browser_node=None, sequences_logic=None,
                            output_name: str | None = None) -> DespeckleRun:
    """Despeckle every frame of a volume sequence into a new sequence with the same index values.

    With `browser_node`, the new sequence is added to that browser (and, with `sequences_logic`,
    its proxy volume node is created at once) so both play in step.
    """
    sequence = sequence_from_sequence_node(sequence_node)
    result, caught = _despeckle_noting_warnings(sequence, settings, device, progress, cancel)
    name = output_name or f"{sequence_node.GetName()} {describe(settings).split()[0]}"
    node = new_sequence_node(scene, result.output, name)
    if browser_node is not None:
        browser_node.AddSynchronizedSequenceNodeID(node.GetID())
        if sequences_logic is not None:
            sequences_logic.UpdateProxyNodesFromSequences(browser_node)
            proxy = browser_node.GetProxyNode(node)
            if proxy is not None:
                proxy.SetName(scene.GenerateUniqueName(name))
                proxy.CreateDefaultDisplayNodes()
    smpi = [_smpi(a, b) for a, b in zip(sequence.frames, result.output.frames)]
    return DespeckleRun(node, smpi, result.seconds_per_frame, result.device, describe(settings),
                        caught)
