"""The MRML layer: Slicer volume, sequence and transform nodes <-> us3d arrays and images.

Imports Slicer's MRML classes and vtk only (never qt, ctk or slicer.app), so it runs inside
Slicer and, unchanged, on the PyPI package slicer-core with a plain vtkMRMLScene.
"""
