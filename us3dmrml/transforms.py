"""ITK displacement fields <-> Slicer grid transform nodes (RAS).

A field d (LPS, mm, on the fixed grid) maps a fixed point x to the moving point x + d(x): the
resampling direction. In Slicer that is the transform *from parent*: a moving volume placed
under the node is shown as moving(x + d(x)), i.e. warped onto the fixed volume.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from us3d.geometry import LPS_FROM_RAS
from us3d.registration.fields import field_array
from us3dmrml.nodes import vtk_matrix



def grid_transform_from_field(field: sitk.Image) -> "slicer.vtkOrientedGridTransform":
    displacement = field_array(field) @ LPS_FROM_RAS.T  # (k, j, i, 3) RAS components
    grid = vtk.vtkImageData()
    size = field.GetSize()
    grid.SetDimensions(*size)
    grid.SetSpacing(*field.GetSpacing())
    grid.SetOrigin(*(LPS_FROM_RAS @ np.array(field.GetOrigin())))
    vectors = numpy_support.numpy_to_vtk(np.ascontiguousarray(displacement.reshape(-1, 3)), deep=True,
                                         array_type=vtk.VTK_DOUBLE)
    vectors.SetNumberOfComponents(3)
    grid.GetPointData().SetScalars(vectors)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(vtk_matrix(LPS_FROM_RAS @ np.reshape(field.GetDirection(), (3, 3))))
    transform.SetInterpolationModeToLinear()
    return transform


def new_grid_transform_node(scene, field: sitk.Image, name: str):
    """Add a vtkMRMLGridTransformNode holding `field` (as the transform from parent) to `scene`."""
    node = slicer.vtkMRMLGridTransformNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    node.SetAndObserveTransformFromParent(grid_transform_from_field(field))
    return node


def grid_transform_sequence(scene, fields, index_values: list[str], name: str, index_name: str = "time",
                            index_unit: str = "s", index_type: str = "numeric"):
    """A sequence node (not yet in `scene`, named uniquely in it) of grid transform nodes, one per
    field (`fields` may be any iterable, read one at a time) at `index_values`."""
    sequence = slicer.vtkMRMLSequenceNode()
    sequence.SetName(scene.GenerateUniqueName(name))
    sequence.SetIndexName(index_name)
    sequence.SetIndexUnit(index_unit)
    sequence.SetIndexTypeFromString(index_type)
    for field, value in zip(fields, index_values):
        grid = slicer.vtkMRMLGridTransformNode()
        grid.SetAndObserveTransformFromParent(grid_transform_from_field(field))
        sequence.SetDataNodeAtValue(grid, value)
    return sequence
