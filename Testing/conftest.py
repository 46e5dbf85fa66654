import sys
from pathlib import Path

import pytest

from us3d.allocator import reuse_freed_memory

ROOT = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = ROOT.parent / "shared" / "reference"
sys.path.insert(0, str(Path(__file__).resolve().parent))
reuse_freed_memory()  # as the us3d CLI does: the simulated sequences' large tensors then reuse freed memory


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
