import subprocess
import sys
from pathlib import Path

import pytest

from us3d.allocator import reuse_freed_memory

ROOT = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = ROOT.parent / "shared" / "reference"
sys.path.insert(0, str(Path(__file__).resolve().parent))
reuse_freed_memory()  # as the us3d CLI does: the simulated sequences' large tensors then reuse freed memory


#: What a child process runs to compile OBNLM's numba kernels into numba's cache (us3d/filters/__pycache__).
COMPILE_OBNLM = ("import numpy as np; from us3d.despeckling import ObnlmSettings, despeckle_array; "
                 "despeckle_array(np.random.default_rng(0).uniform(0, 255, (4, 16, 16)).astype(np.float32), "
                 "ObnlmSettings(), 'cpu')")


@pytest.fixture(scope="session", autouse=True)
def obnlm_compiled_beside_the_first_tests():
    """In a fresh checkout numba compiles OBNLM's kernels on their first use: about 30 s on one core. A
    child compiles them at the start of the session, while the first tests compile and run the
    registration's kernels, so that the OBNLM tests load them from the cache. Nothing waits for it: a
    test that needs them first compiles them itself (numba writes its cache files atomically)."""
    child = subprocess.Popen([sys.executable, "-c", COMPILE_OBNLM], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    yield
    if child.poll() is None:
        child.kill()
    child.wait()


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return ROOT / "Resources" / "SampleData"


@pytest.fixture()
def scene():
    """A fresh vtkMRMLScene from slicer-core (Slicer's own MRML, no application)."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(1)


@pytest.fixture()
def sequences_logic(scene):
    """The Sequences module's logic on `scene`: it creates the browsers' proxy nodes."""
    import slicer

    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    return logic
