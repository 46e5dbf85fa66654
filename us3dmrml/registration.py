"""Registration of volume nodes and sequences in a MRML scene (the USRegistration module's work).

Fixed: a volume, or every frame of a sequence (the paper's protocol, with the moving volume
being the exhale/reference frame). Outputs: the warped moving volume (or a warped sequence) and
the displacement as grid transform nodes (a sequence of them for 4D), all created only after
every frame is done, so a cancelled or failed run adds nothing. Inputs are never changed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from us3d.errors import Cancelled, InputError
from us3d.io import VolumeSequence
from us3d.registration.pairs import PairResult, despeckled, on_fixed_grid, register_pair, registrar
from us3dmrml.nodes import image_from_volume_node, new_sequence_node, new_volume_node
from us3dmrml.transforms import grid_transform_from_field, new_grid_transform_node


@dataclasses.dataclass
class RegistrationRun:
    """New nodes and, per fixed frame, what the panel shows."""

    warped_node: object  # volume node, or sequence node for 4D
    transform_node: object  # grid transform node, or sequence node of them for 4D
    results: list[PairResult]


def register_volume_nodes(scene, fixed_node, moving_node, method: str = "voxelmorph", preprocessing: str = "none",
                          device: str = "auto", cancel: Callable[[], bool] | None = None) -> RegistrationRun:
    """Warp `moving_node` onto `fixed_node`: a new warped volume and a new grid transform node
    (placing the moving volume under that transform shows the same warped volume)."""
    fixed, moving = image_from_volume_node(fixed_node), image_from_volume_node(moving_node)
    result = register_pair(fixed, moving, method, preprocessing, device, cancel=cancel)
    name = f"{moving_node.GetName()} to {fixed_node.GetName()}"
    warped = new_volume_node(scene, result.warped, f"{name} warped")
    transform = new_grid_transform_node(scene, result.field, f"{name} displacement")
    return RegistrationRun(warped, transform, [result])


def register_sequence_node(scene, fixed_sequence, moving_node, method: str = "voxelmorph", preprocessing: str = "none",
                           device: str = "auto", progress: Callable[[int, int], None] | None = None,
                           cancel: Callable[[], bool] | None = None, browser_node=None,
                           sequences_logic=None) -> RegistrationRun:
    """Warp `moving_node` onto every frame of `fixed_sequence`: a warped sequence and a sequence
    of grid transforms with the fixed sequence's index values (added to `browser_node`)."""
    import slicer

    count = fixed_sequence.GetNumberOfDataNodes() if fixed_sequence is not None else 0
    if count == 0:
        raise InputError("the fixed sequence has no frames")
    # the moving volume on the frames' grid and despeckled once, for all frames
    moving, resampled = on_fixed_grid(image_from_volume_node(fixed_sequence.GetNthDataNode(0)),
                                      image_from_volume_node(moving_node))
    moving_in = despeckled(moving, preprocessing, device, cancel)
    register = registrar(method, preprocessing, device)  # a VoxelMorph model is loaded once for all frames
    results, values = [], []
    for n in range(count):
        if cancel is not None and cancel():
            raise Cancelled()
        frame = image_from_volume_node(fixed_sequence.GetNthDataNode(n))
        if n > 0 and frame.GetSize() != results[0].field.GetSize():
            raise InputError(f"frame {n} of {fixed_sequence.GetName()} has another size than frame 0")
        result = register_pair(frame, moving, method, preprocessing, device, cancel=cancel, moving_despeckled=moving_in,
                               register=register)
        result.resampled = resampled
        results.append(result)
        values.append(fixed_sequence.GetNthIndexValue(n))
        if progress is not None:
            progress(n + 1, count)
    name = f"{moving_node.GetName()} to {fixed_sequence.GetName()}"
    warped_frames = VolumeSequence.from_images([r.warped for r in results], values, fixed_sequence.GetIndexName(),
                                               fixed_sequence.GetIndexUnit())
    transforms = slicer.vtkMRMLSequenceNode()
    transforms.SetName(scene.GenerateUniqueName(f"{name} displacement"))
    transforms.SetIndexName(fixed_sequence.GetIndexName())
    transforms.SetIndexUnit(fixed_sequence.GetIndexUnit())
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
