"""Which of us3d's Python dependencies are importable (Slicer's Python lacks some of them).

Imports nothing heavy, so the Slicer modules can ask before torch is installed.
"""

from __future__ import annotations

import importlib.metadata
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


#: The oldest PyTorch that loads and runs the bundled TorchScript models (checked with
#: `python Testing/torch_compat.py --python <a Python with that torch>`; 2.4.1 gave the same outputs).
TORCH_MINIMUM = (2, 4)
TORCH_REQUIREMENT = ">=2.4"


def _release(version: str) -> tuple[int, ...]:
    """(2, 4, 1) from "2.4.1+cu121"; leading numbers only."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
    return tuple(numbers)


def torch_version_problem(version: str | None = None) -> str | None:
    """A sentence when the installed PyTorch (or `version`) is older than TORCH_MINIMUM, else None
    (also when torch is not installed: `missing_packages` reports that). Reads the package metadata,
    so torch is not imported."""
    if version is None:
        try:
            version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return None
    if _release(version) >= TORCH_MINIMUM:
        return None
    return (f"PyTorch {version} is too old for the bundled models (torch{TORCH_REQUIREMENT} is needed): update it "
            "with 'Install dependencies' or the PyTorch Utils module, then restart Slicer")


def dependency_problem() -> str | None:
    """What keeps the modules from running, as one sentence for the panel (missing packages or a
    too old PyTorch); None when every dependency is usable."""
    missing = missing_packages()
    if missing:
        return (f"Missing Python packages: {', '.join(missing)}. Click 'Install dependencies' "
                "(PyTorch comes from the PyTorch extension).")
    return torch_version_problem()


def cuda_may_be_available() -> bool:
    """Whether PyTorch may see a CUDA GPU, answered without importing torch (which takes seconds and
    would freeze Slicer's panel): when torch is imported already, its own answer; otherwise True if
    the installed torch is not a CPU-only build ("+cpu" in its version, or macOS) and the NVIDIA
    driver library is present. A run on "cuda" still checks for itself."""
    import ctypes.util
    import sys

    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    if "+cpu" in version or sys.platform == "darwin":
        return False
    return ctypes.util.find_library("nvcuda" if sys.platform == "win32" else "cuda") is not None
