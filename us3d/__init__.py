"""us3d: speckle reduction, metrics and simulation for 3D/4D ultrasound (the logic layer of the
USDespeckle and USRegistration 3D Slicer modules). No Slicer, Qt or VTK imports here."""

__version__ = "0.1.0"
