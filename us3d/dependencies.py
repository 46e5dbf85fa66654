"""Which of us3d's Python dependencies are importable (Slicer's Python lacks some of them).

Imports nothing heavy, so the Slicer modules can ask before torch is installed.
"""

from __future__ import annotations

import importlib.util
import re

from us3d.resources import RESOURCES

#: Lower-bound requirements of what Slicer's Python does not ship (torch comes from the PyTorch
#: extension instead, which picks the CUDA build for the machine).
REQUIREMENTS_FILE = RESOURCES / "requirements.txt"
#: distribution name -> import name
IMPORT_NAMES = {"scikit-image": "skimage", "numba": "numba", "pynrrd": "nrrd"}


def pip_requirements() -> dict[str, str]:
    """import name -> pip requirement (e.g. "skimage" -> "scikit-image>=0.22"), from REQUIREMENTS_FILE."""
    requirements = {}
    for line in REQUIREMENTS_FILE.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0]
            requirements[IMPORT_NAMES.get(name, name)] = line
    return requirements


PIP_REQUIREMENTS = pip_requirements()
REQUIRED = ("numpy", "SimpleITK", "torch", *PIP_REQUIREMENTS)


def missing_packages() -> list[str]:
    """Import names of the required packages that cannot be imported here (asked afresh: the import
    system's caches are cleared first, so packages installed since are seen)."""
    importlib.invalidate_caches()
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]
