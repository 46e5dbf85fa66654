"""Which of us3d's Python dependencies are importable (Slicer's Python lacks some of them).

Imports nothing heavy, so the Slicer modules can ask before torch is installed.
"""

from __future__ import annotations

import importlib.util

#: import name -> pip requirement, for what Slicer's Python does not ship (torch comes from the
#: PyTorch extension instead, which picks the CUDA build for the machine). Versions as in
#: constraints.txt.
PIP_REQUIREMENTS = {
    "skimage": "scikit-image==0.26.0",
    "numba": "numba==0.68.1",
    "nrrd": "pynrrd==1.1.3",
}
REQUIRED = ("numpy", "SimpleITK", "torch", *PIP_REQUIREMENTS)


def missing_packages() -> list[str]:
    """Import names of the required packages that cannot be imported here (asked afresh: the import
    system's caches are cleared first, so packages installed since are seen)."""
    importlib.invalidate_caches()
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]
