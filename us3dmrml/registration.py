"""Registration of volume nodes and sequences in a MRML scene (the USRegistration module's work).

Fixed: a volume, or every frame of a sequence (the paper's protocol, with the moving volume
being the exhale/reference frame). Outputs: the warped moving volume (or a warped sequence) and
the displacement as grid transform nodes (a sequence of them for 4D), all created only after
every frame is done, so a cancelled or failed run adds nothing. Inputs are never changed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from us3d.errors import InputError
from us3d.io import VolumeSequence
from us3d.registration.pairs import PairResult, Registrar, RegistrationSettings
from us3dmrml.nodes import image_from_volume_node, new_sequence_node, new_volume_node, sequence_from_sequence_node
from us3dmrml.transforms import grid_transform_from_field, new_grid_transform_node


@dataclasses.dataclass
class RegistrationRun:
    """New nodes and, per fixed frame, what the panel shows."""

    warped_node: object  # volume node, or sequence node for 4D
    transform_node: object  # grid transform node, or sequence node of them for 4D
    results: list[PairResult]


def register_volume_nodes(scene, fixed_node, moving_node, settings: RegistrationSettings = RegistrationSettings(),
                          cancel: Callable[[], bool] | None = None) -> RegistrationRun:
    """Warp `moving_node` onto `fixed_node`: a new warped volume and a new grid transform node
    (placing the moving volume under that transform shows the same warped volume)."""
    fixed, moving = image_from_volume_node(fixed_node), image_from_volume_node(moving_node)
    result = Registrar(settings).register_pair(fixed, moving, cancel=cancel)
    name = f"{moving_node.GetName()} to {fixed_node.GetName()}"
    warped = new_volume_node(scene, result.warped, f"{name} warped")
    transform = new_grid_transform_node(scene, result.field, f"{name} displacement")
    return RegistrationRun(warped, transform, [result])


def register_sequence_node(scene, fixed_sequence, moving_node, settings: RegistrationSettings = RegistrationSettings(),
                           progress: Callable[[int, int], None] | None = None,
                           cancel: Callable[[], bool] | None = None, browser_node=None,
                           sequences_logic=None) -> RegistrationRun:
    """Warp `moving_node` onto every frame of `fixed_sequence` (`Registrar.register_sequence`): a
    warped sequence and a sequence of grid transforms with the fixed sequence's index values (added
    to `browser_node`)."""
    import slicer

    if fixed_sequence is None or fixed_sequence.GetNumberOfDataNodes() == 0:
        raise InputError("the fixed sequence has no frames")
    frames = sequence_from_sequence_node(fixed_sequence)
    results = Registrar(settings).register_sequence(frames, image_from_volume_node(moving_node), progress=progress,
                                                    cancel=cancel)
    values = frames.index_values
    name = f"{moving_node.GetName()} to {fixed_sequence.GetName()}"
    warped_frames = VolumeSequence.from_images([r.warped for r in results], values, fixed_sequence.GetIndexName(),
                                               fixed_sequence.GetIndexUnit(), fixed_sequence.GetIndexTypeAsString())
    transforms = slicer.vtkMRMLSequenceNode()
    transforms.SetName(scene.GenerateUniqueName(f"{name} displacement"))
    transforms.SetIndexName(fixed_sequence.GetIndexName())
    transforms.SetIndexUnit(fixed_sequence.GetIndexUnit())
    transforms.SetIndexType(fixed_sequence.GetIndexType())
    for result, value in zip(results, values):
        grid = slicer.vtkMRMLGridTransformNode()
        grid.SetAndObserveTransformFromParent(grid_transform_from_field(result.field))
        transforms.SetDataNodeAtValue(grid, value)
    warped = new_sequence_node(scene, warped_frames, f"{name} warped")  # into the scene only now that all is made
    scene.AddNode(transforms)
    if browser_node is not None:
        for sequence in (warped, transforms):
            browser_node.AddSynchronizedSequenceNodeID(sequence.GetID())
        if sequences_logic is not None:
            sequences_logic.UpdateProxyNodesFromSequences(browser_node)
    return RegistrationRun(warped, transforms, results)
