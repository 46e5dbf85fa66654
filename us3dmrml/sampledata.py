"""The modules' sample data, for trying them without data of one's own: a simulated 4D liver
sequence with its true breathing motion (made by the project's simulator at first use, then kept in
a cache folder) and the real spine volume shipped in Resources/SampleData (PLUS toolkit, BSD-3-Clause).

The Slicer modules list both in the Sample Data module (`USDespeckle.registerSampleData`); the
loading itself is here, on the MRML scene, so the tests run it on slicer-core.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import slicer

from us3d.resources import RESOURCES
from us3dmrml.nodes import new_sequence_node, new_volume_node
from us3dmrml.transforms import grid_transform_sequence

LIVER_PHANTOM = "US3D liver phantom"
SPINE_PHANTOM = "US3D spine phantom"
SPINE_FILE = RESOURCES / "SampleData" / "SpinePhantomFreehandReconstructed.mha"
#: The simulated sequence: standard conditions (128x128x32 voxels of 0.4x0.3x0.8 mm, breathing up to 12 mm).
LIVER_FRAMES, LIVER_SEED = 8, 0


def liver_phantom_folder(cache: str | os.PathLike, frames: int = LIVER_FRAMES, seed: int = LIVER_SEED) -> Path:
    """The folder in `cache` holding the simulated sequence (`bmode.seq.nrrd`) and its truth
    (`truth/displacement_NNN.mha`, as `us3d phantom --truth-dir` writes it); simulated on the first
    call, complete or absent: it is written under another name and renamed at the end."""
    from us3d import simulate
    from us3d.phantom.export import write_phantom

    folder = Path(cache) / f"us3d-liver-phantom-{frames}f-seed{seed}"
    if (folder / "bmode.seq.nrrd").exists():
        return folder
    Path(cache).mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=".us3d-liver-", dir=cache))
    try:
        (temporary / "truth").mkdir()
        write_phantom(simulate(frames, seed), temporary / "bmode.seq.nrrd", temporary / "truth")
        temporary.replace(folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def load_liver_phantom(scene, cache: str | os.PathLike, sequences_logic=None,
                       frames: int = LIVER_FRAMES) -> tuple[object, object, object]:
    """(browser, B-mode sequence node, true-motion sequence node) added to `scene`.

    The true motion is a sequence of grid transforms: placing frame 0 (the exhale frame) under the
    transform of frame t shows it moved to frame t, as a registration's output transforms do; both
    sequences share one browser. `sequences_logic` (Slicer's Sequences module logic) makes the proxy
    nodes shown in the views.
    """
    from us3d import read
    from us3d.registration.fields import read_field

    folder = liver_phantom_folder(cache, frames)
    sequence = read(folder / "bmode.seq.nrrd")
    fields = (read_field(folder / "truth" / f"displacement_{t:03d}.mha") for t in range(len(sequence)))
    truth = grid_transform_sequence(scene, fields, sequence.index_values, f"{LIVER_PHANTOM} true motion",
                                    sequence.index_name, sequence.index_unit, sequence.index_type)
    bmode = new_sequence_node(scene, sequence, LIVER_PHANTOM)
    scene.AddNode(truth)
    browser = slicer.vtkMRMLSequenceBrowserNode()
    browser.SetName(scene.GenerateUniqueName(f"{LIVER_PHANTOM} browser"))
    scene.AddNode(browser)
    browser.SetAndObserveMasterSequenceNodeID(bmode.GetID())
    browser.AddSynchronizedSequenceNodeID(truth.GetID())
    if sequences_logic is not None:
        sequences_logic.UpdateProxyNodesFromSequences(browser)
    return browser, bmode, truth


def load_spine_volume(scene) -> object:
    """The real 3D ultrasound volume of a spine phantom (a freehand sweep reconstructed into a
    volume) as a new scalar volume node."""
    from us3d import read

    return new_volume_node(scene, read(SPINE_FILE), SPINE_PHANTOM)
