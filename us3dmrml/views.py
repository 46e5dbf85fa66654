"""Offscreen slice views rendered by MRML's own slice logic (no OpenGL, no application):
what a Slicer slice view shows, for screenshots in documentation and tests."""

from __future__ import annotations

import numpy as np
import slicer
from vtk.util import numpy_support


def color_logic(scene):
    """A colour logic on `scene`: it adds the default colour tables (the grey lookup table of
    volume display nodes). Keep it alive while rendering; it removes its tables when deleted."""
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    return colors


def render_slice(scene, volume_node, view_name: str = "Red", orientation: str = "Axial",
                 size: tuple[int, int] = (400, 400), window: tuple[float, float] | None = None) -> np.ndarray:
    """RGB image (rows, columns, 3) uint8 of `volume_node` through the centre of its field of
    view, as a slice view of that name and orientation shows it."""
    colors = color_logic(scene) if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None else None
    if volume_node.GetDisplayNode() is None:
        volume_node.CreateDefaultDisplayNodes()
    display = volume_node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    if window is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(*window)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLScene(scene)
    try:
        slice_node = logic.AddSliceNode(view_name)
        slice_node.SetOrientation(orientation)
        slice_node.SetDimensions(size[0], size[1], 1)
        logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
        logic.FitSliceToAll()
        producer = logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        columns, rows, _ = image.GetDimensions()
        rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(rows, columns, -1)
        return np.ascontiguousarray(rgba[::-1, :, :3])  # VTK's first row is the bottom one
    finally:  # leave the scene as it was: no slice or composite node stays behind
        added = [logic.GetSliceNode(), logic.GetSliceCompositeNode()]
        logic.SetMRMLScene(None)
        for node in added:
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)
        del colors


def side_by_side(images: list[np.ndarray], gap: int = 6) -> np.ndarray:
    """Images of equal height next to each other, separated by `gap` black columns."""
    rows = images[0].shape[0]
    spacer = np.zeros((rows, gap, 3), np.uint8)
    parts = []
    for image in images:
        parts += [image, spacer]
    return np.concatenate(parts[:-1], axis=1)
