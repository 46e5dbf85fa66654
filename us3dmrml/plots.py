"""Per-frame figures of a run as a Slicer plot: a table node, one plot series per figure and a
chart node (the widget shows the chart in the layout). No Qt here, so it is tested on slicer-core.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk


def frame_plot(scene, name: str, figures: dict[str, list[float]], y_title: str):
    """A chart of `figures` (name -> one value per frame) against the frame number; returns the
    chart node. Its table and series are new nodes too (named after `name`)."""
    table = slicer.vtkMRMLTableNode()
    table.SetName(scene.GenerateUniqueName(f"{name} table"))
    columns = {"frame": np.arange(len(next(iter(figures.values()))), dtype=float)}
    columns.update({key: np.asarray(values, dtype=float) for key, values in figures.items()})
    for key, values in columns.items():
        column = vtk.vtkDoubleArray()
        column.SetName(key)
        for value in values:
            column.InsertNextValue(float(value))
        table.AddColumn(column)
    scene.AddNode(table)
    chart = slicer.vtkMRMLPlotChartNode()
    chart.SetName(scene.GenerateUniqueName(f"{name} chart"))
    chart.SetTitle(name)
    chart.SetXAxisTitle("frame")
    chart.SetYAxisTitle(y_title)
    scene.AddNode(chart)
    for key in figures:
        series = slicer.vtkMRMLPlotSeriesNode()
        series.SetName(scene.GenerateUniqueName(f"{name} {key}"))
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("frame")
        series.SetYColumnName(key)
        series.SetUniqueColor()
        scene.AddNode(series)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return chart
