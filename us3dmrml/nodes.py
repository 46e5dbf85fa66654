"""Volume and sequence nodes <-> SimpleITK images and `us3d.io.VolumeSequence`, geometry kept.

MRML stores geometry in RAS; SimpleITK and us3d in LPS. Arrays are (k, j, i) in both.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from us3d.errors import InputError
from us3d.geometry import LPS_FROM_RAS
from us3d.io import VolumeSequence



def check_volume_node(node) -> None:
    """Raise InputError unless `node` is a scalar 3D volume node with voxels."""
    if node is None:
        raise InputError("no input volume selected")
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{node.GetName()} is not a scalar (grey-level) volume")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"{node.GetName()} has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{node.GetName()} has {image.GetNumberOfScalarComponents()} components per voxel "
                         "(e.g. RGB); a grey-level volume is needed")
    if sum(size > 1 for size in image.GetDimensions()) < 3:
        raise InputError(f"{node.GetName()} is a 2D image; a 3D volume is needed")


def array_from_volume_node(node) -> np.ndarray:
    """A copy of the node's voxels as a (k, j, i) array."""
    image = node.GetImageData()
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(dims[2], dims[1], dims[0]).copy()


def _geometry(node) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in LPS, as SimpleITK wants them."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(matrix)
    direction_ras = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    direction = LPS_FROM_RAS @ direction_ras
    origin = LPS_FROM_RAS @ np.array(node.GetOrigin())
    return tuple(node.GetSpacing()), tuple(float(v) for v in origin), tuple(float(v) for v in direction.ravel())


def image_from_volume_node(node) -> sitk.Image:
    """The node's voxels and geometry as a SimpleITK image (LPS)."""
    check_volume_node(node)
    image = sitk.GetImageFromArray(array_from_volume_node(node))
    spacing, origin, direction = _geometry(node)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def vtk_matrix(direction: np.ndarray) -> vtk.vtkMatrix4x4:
    """A vtkMatrix4x4 whose upper-left 3x3 block is `direction` (the rest identity)."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(direction[r][c]))
    return matrix


def _set_geometry(node, spacing, origin_lps, direction_lps) -> None:
    node.SetIJKToRASDirectionMatrix(vtk_matrix(LPS_FROM_RAS @ np.reshape(direction_lps, (3, 3))))
    node.SetSpacing(*spacing)
    node.SetOrigin(*(LPS_FROM_RAS @ np.asarray(origin_lps, float)))


def _set_voxels(node, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image)


def new_volume_node(scene, image: sitk.Image, name: str, display: bool = True):
    """Add a scalar volume node holding `image` (voxels and geometry) to `scene`."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(scene.GenerateUniqueName(name))
    _set_voxels(node, sitk.GetArrayFromImage(image))
    _set_geometry(node, image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    scene.AddNode(node)
    if display:
        node.CreateDefaultDisplayNodes()
    return node


def sequence_from_sequence_node(node) -> VolumeSequence:
    """Every frame of a sequence of scalar volumes, with index values; frames must share a grid."""
    if node is None:
        raise InputError("no input sequence selected")
    count = node.GetNumberOfDataNodes()
    if count == 0:
        raise InputError(f"sequence {node.GetName()} has no frames")
    frames, first = [], None
    for n in range(count):
        image = image_from_volume_node(node.GetNthDataNode(n))  # checks the frame
        if first is None:
            first = image
        elif image.GetSize() != first.GetSize():
            raise InputError(f"frame {n} of {node.GetName()} has size {image.GetSize()}, frame 0 has "
                             f"{first.GetSize()}; all frames must have the same size")
        frames.append(sitk.GetArrayViewFromImage(image).copy())
    index_values = [node.GetNthIndexValue(n) for n in range(count)]
    return VolumeSequence(np.stack(frames), first.GetSpacing(), first.GetOrigin(),
                          np.reshape(first.GetDirection(), (3, 3)), index_values=index_values,
                          index_name=node.GetIndexName(), index_unit=node.GetIndexUnit(),
                          index_type=node.GetIndexTypeAsString())


def new_sequence_node(scene, sequence: VolumeSequence, name: str):
    """Add a sequence node of new scalar volume nodes (one per frame, index values kept) to `scene`."""
    node = slicer.vtkMRMLSequenceNode()
    node.SetName(scene.GenerateUniqueName(name))
    node.SetIndexName(sequence.index_name)
    node.SetIndexUnit(sequence.index_unit)
    node.SetIndexTypeFromString(sequence.index_type)
    for n, value in enumerate(sequence.index_values):
        frame = slicer.vtkMRMLScalarVolumeNode()
        _set_voxels(frame, sequence.frames[n])
        _set_geometry(frame, sequence.spacing, sequence.origin, np.ravel(sequence.direction))
        node.SetDataNodeAtValue(frame, value)
    scene.AddNode(node)
    return node


def sequence_of_proxy_node(scene, node) -> tuple[object, object]:
    """(sequence node, browser node) when `node` is the proxy (displayed frame) of a sequence
    browser in `scene`, else (None, None). This is how a 4D volume shows up in Slicer."""
    if node is None:
        return None, None
    for browser in nodes_of_class(scene, "vtkMRMLSequenceBrowserNode"):
        if browser.IsProxyNodeID(node.GetID()):
            sequence = browser.GetSequenceNode(node)
            if sequence is not None:
                return sequence, browser
    return None, None


def nodes_of_class(scene, class_name: str) -> list:
    """The scene's nodes of `class_name`; the collection the scene hands out is released (it is a
    new reference that Python would otherwise leak)."""
    collection = scene.GetNodesByClass(class_name)
    collection.UnRegister(None)
    return [collection.GetItemAsObject(n) for n in range(collection.GetNumberOfItems())]
