"""Self-test scenarios over a MRML scene, written once and run in two places: by the modules'
ScriptedLoadableModuleTest inside Slicer, and by pytest on slicer-core (Testing/).

Each scenario takes a scene (and, where needed, a sequences logic), raises AssertionError on
failure and removes the nodes it added.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

import us3d
from us3d.despeckling import Cancelled, ObnlmSettings, UnetSettings
from us3d.errors import InputError
from us3d.registration.pairs import RegistrationSettings
from us3d.registration.synthetic import shifted_blobs
from us3dmrml.despeckle import despeckle_sequence_node, despeckle_volume_node, finish_despeckle, start_despeckle
from us3dmrml.nodes import _set_geometry, _set_voxels, array_from_volume_node

SPACING = (0.4, 0.3, 0.8)
ORIGIN_LPS = (12.5, -30.0, 7.25)
# An oblique direction (rotation about the elevation axis), columns in LPS.
_ANGLE = np.deg2rad(20.0)
DIRECTION_LPS = (np.cos(_ANGLE), -np.sin(_ANGLE), 0.0, np.sin(_ANGLE), np.cos(_ANGLE), 0.0, 0.0, 0.0, 1.0)


def speckle_volume(shape=(6, 40, 48), seed: int = 0) -> np.ndarray:
    """Rayleigh speckle over two regions, log-compressed to uint8, (k, j, i)."""
    rng = np.random.default_rng(seed)
    envelope = rng.rayleigh(1.0, shape) * np.where(np.arange(shape[2]) < shape[2] // 2, 1.0, 2.5)
    return np.clip(40 * np.log(1 + 4 * envelope) + 20, 0, 255).astype(np.uint8)


def blob_volume(shift_mm: tuple[float, float, float]) -> np.ndarray:
    """Smooth blobs (k, j, i), moved by `shift_mm` (x, y, z): a registration with a known answer."""
    return sitk.GetArrayFromImage(shifted_blobs(shift_mm=shift_mm))


def volume_node(array: np.ndarray, name: str = "US volume"):
    """A scalar volume node (not in a scene) on the oblique test geometry."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    _set_voxels(node, array)
    _set_geometry(node, SPACING, ORIGIN_LPS, DIRECTION_LPS)
    return node


def add_volume(scene, array: np.ndarray, name: str = "US volume"):
    node = volume_node(array, name)
    scene.AddNode(node)
    return node


def sequence_node(arrays: list[np.ndarray], index_values: list[str], name: str, index_type: str = "numeric"):
    """A sequence node (not in a scene) of volume nodes on the oblique test geometry."""
    sequence = slicer.vtkMRMLSequenceNode()
    sequence.SetName(name)
    sequence.SetIndexTypeFromString(index_type)
    for array, value in zip(arrays, index_values):
        sequence.SetDataNodeAtValue(volume_node(array), value)
    return sequence


def add_sequence(scene, frames: int = 5, name: str = "US sequence", arrays: list[np.ndarray] | None = None,
                 index_values: list[str] | None = None, index_type: str = "numeric"):
    """A sequence and its browser: `arrays` (default: `frames` speckle volumes) with `index_values`
    (default 0, 0.2, ...)."""
    arrays = arrays if arrays is not None else [speckle_volume(seed=t) for t in range(frames)]
    values = index_values or [f"{0.2 * t:g}" for t in range(len(arrays))]
    sequence = sequence_node(arrays, values, name, index_type)
    scene.AddNode(sequence)
    browser = slicer.vtkMRMLSequenceBrowserNode()
    browser.SetName(name + " browser")
    scene.AddNode(browser)
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    return sequence, browser


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_hash(node) -> str:
    digest = hashlib.sha256(array_from_volume_node(node).tobytes())
    digest.update(ijk_to_ras(node).tobytes())
    return digest.hexdigest()


def cancelled_after_two_frames(run) -> list[int]:
    """Call run(progress, cancel) with a cancel that answers yes once two frames are done; the
    frames reported done. Raises AssertionError if the run was not cancelled."""
    done = []
    try:
        run(lambda d, t: done.append(d) if d > 0 else None, lambda: len(done) >= 2)  # 0: the work is ready
    except Cancelled:
        return done
    raise AssertionError("the run was not cancelled")


def _remove(scene, *nodes) -> None:
    for node in nodes:
        if node is not None and node.GetScene() is scene:
            scene.RemoveNode(node)  # a sequence's frames live in the sequence's own scene and go with it


def scenario_volume_keeps_geometry_and_input(scene, settings=None) -> None:
    """OBNLM (or `settings`) on an oblique volume: new node, same geometry, input unchanged."""
    settings = settings or ObnlmSettings()
    array = speckle_volume()
    node = add_volume(scene, array)
    before = volume_hash(node)
    run = despeckle_volume_node(scene, node, settings, "cpu")
    try:
        assert run.output_node is not node and run.output_node.GetScene() is scene
        assert volume_hash(node) == before, "the input volume was changed"
        np.testing.assert_allclose(ijk_to_ras(run.output_node), ijk_to_ras(node), atol=1e-9)
        output = array_from_volume_node(run.output_node)
        assert output.shape == array.shape and output.dtype == np.float32
        if isinstance(settings, ObnlmSettings):
            expected = us3d.despeckle(array.astype(np.float32), **settings.arguments(), device="cpu")
            np.testing.assert_allclose(output, expected, atol=1e-4)
        assert len(run.smpi) == 1 and np.isfinite(run.smpi[0]) and run.seconds_per_frame[0] > 0
        assert output.std() < array.std(), "speckle was not reduced"
    finally:
        _remove(scene, node, run.output_node)


def scenario_sequence_in_sequence_out(scene, sequences_logic=None, settings=None) -> None:
    """Every frame despeckled into a new sequence with the same index values, in the same browser."""
    settings = settings or ObnlmSettings()
    sequence, browser = add_sequence(scene)
    frames_before = [volume_hash(sequence.GetNthDataNode(n)) for n in range(5)]
    seen = []
    run = despeckle_sequence_node(scene, sequence, settings, "cpu", progress=lambda d, t: seen.append((d, t)),
                                  browser_node=browser, sequences_logic=sequences_logic)
    out = run.output_node
    try:
        assert seen == [(n, 5) for n in range(0, 6)]  # 0: the filter is ready
        assert [out.GetNthIndexValue(n) for n in range(5)] == [sequence.GetNthIndexValue(n) for n in range(5)]
        assert out.GetIndexName() == sequence.GetIndexName() and out.GetIndexUnit() == sequence.GetIndexUnit()
        assert browser.IsSynchronizedSequenceNodeID(out.GetID())
        if sequences_logic is not None:
            assert browser.GetProxyNode(out) is not None
        for n in range(5):
            np.testing.assert_allclose(ijk_to_ras(out.GetNthDataNode(n)), ijk_to_ras(sequence.GetNthDataNode(n)),
                                       atol=1e-9)
        assert [volume_hash(sequence.GetNthDataNode(n)) for n in range(5)] == frames_before
        assert len(run.smpi) == 5 and len(run.seconds_per_frame) == 5
    finally:
        proxy = browser.GetProxyNode(out)
        _remove(scene, proxy, browser.GetProxyNode(sequence), browser, out, sequence)


def scenario_cancel_leaves_scene_unchanged(scene) -> None:
    """Cancelling after frame 2 of 5 adds no node and changes no node."""
    sequence, browser = add_sequence(scene)
    count = scene.GetNumberOfNodes()
    done = cancelled_after_two_frames(lambda progress, cancel: despeckle_sequence_node(
        scene, sequence, ObnlmSettings(), "cpu", progress, cancel, browser_node=browser))
    try:
        assert done == [1, 2]
        assert scene.GetNumberOfNodes() == count, "a cancelled run left nodes in the scene"
        assert browser.GetNumberOfSynchronizedSequenceNodes() == 0
    finally:
        _remove(scene, browser, sequence)


def scenario_bad_inputs_are_refused(scene) -> None:
    """A 2D image, an RGB volume, an empty sequence, frames of different sizes: one clear error
    each, nothing added."""
    flat = add_volume(scene, speckle_volume((1, 40, 48)), "flat")
    rgb = slicer.vtkMRMLVectorVolumeNode()
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 8)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(image)
    rgb.SetName("rgb")
    scene.AddNode(rgb)
    empty = slicer.vtkMRMLSequenceNode()
    empty.SetName("empty")
    scene.AddNode(empty)
    mixed = sequence_node([speckle_volume((6, 40, 48)), speckle_volume((6, 40, 40))], ["0", "1"], "mixed sizes")
    scene.AddNode(mixed)
    count = scene.GetNumberOfNodes()
    try:
        cases = ((despeckle_volume_node, flat, "2D image"), (despeckle_volume_node, rgb, "components"),
                 (despeckle_sequence_node, empty, "no frames"), (despeckle_sequence_node, mixed, "same size"))
        for run, node, message in cases:
            try:
                run(scene, node, ObnlmSettings(), "cpu")
            except InputError as error:
                assert message in str(error), str(error)
            else:
                raise AssertionError(f"{node.GetName()} was accepted")
        assert scene.GetNumberOfNodes() == count
    finally:
        _remove(scene, flat, rgb, empty, mixed)


def scenario_unet_volume(scene, model: str = "unet-obnlm") -> None:
    """The bundled U-Net on a volume node keeps geometry and input, like OBNLM."""
    scenario_volume_keeps_geometry_and_input(scene, UnetSettings(model))




def scenario_proxy_node_leads_to_its_sequence(scene, sequences_logic) -> None:
    """The volume a user picks for a 4D sequence is the browser's proxy node; it leads back
    to the sequence and the browser."""
    from us3dmrml.nodes import sequence_of_proxy_node

    sequence, browser = add_sequence(scene)
    sequences_logic.UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    plain = add_volume(scene, speckle_volume(), "plain")
    try:
        assert proxy is not None
        assert sequence_of_proxy_node(scene, proxy) == (sequence, browser)
        assert sequence_of_proxy_node(scene, plain) == (None, None)
    finally:
        _remove(scene, plain, proxy, browser, sequence)


#: (scenario, needs the sequences logic) for USDespeckle's self-test.
DESPECKLE_SCENARIOS = ((scenario_volume_keeps_geometry_and_input, False), (scenario_sequence_in_sequence_out, True),
                       (scenario_cancel_leaves_scene_unchanged, False), (scenario_bad_inputs_are_refused, False),
                       (scenario_proxy_node_leads_to_its_sequence, True), (scenario_unet_volume, False))


# --- USRegistration ---------------------------------------------------------------------------

def _interior(image: sitk.Image) -> sitk.Image:
    """A mask on `image`'s grid: 1 except on its outermost voxels."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return sitk.BinaryErode(ones, [1, 1, 1])


def scenario_grid_transform_reproduces_warp(scene) -> None:
    """The moving volume under the output grid transform, hardened by MRML's own transform logic,
    equals the warped output volume (within the field's domain; tolerance 1e-3 of the range)."""
    from us3dmrml.nodes import image_from_volume_node
    from us3dmrml.registration import register_volume_nodes

    fixed = add_volume(scene, blob_volume((0.0, 0.0, 0.0)), "fixed")
    moving = add_volume(scene, blob_volume((1.2, -0.6, 0.0)), "moving")
    hashes = volume_hash(fixed), volume_hash(moving)
    run = register_volume_nodes(scene, fixed, moving, RegistrationSettings(method="demons", device="cpu"))
    hardened = None
    try:
        assert (volume_hash(fixed), volume_hash(moving)) == hashes, "an input volume was changed"
        np.testing.assert_allclose(ijk_to_ras(run.warped_node), ijk_to_ras(fixed), atol=1e-9)
        result = run.results[0]
        assert result.mse_after < 0.5 * result.mse_before and result.folding == 0.0
        hardened = slicer.vtkMRMLScalarVolumeNode()
        hardened.Copy(moving)
        hardened.SetName("hardened")
        scene.AddNode(hardened)
        hardened.SetAndObserveTransformNodeID(run.transform_node.GetID())
        slicer.vtkSlicerTransformLogic().hardenTransform(hardened)
        theirs = image_from_volume_node(hardened)  # MRML resamples onto a grid of its choice
        # what the warped output holds, sampled on MRML's grid: moving(x + d(x)), one interpolation
        field = sitk.DisplacementFieldTransform(sitk.Cast(result.field, sitk.sitkVectorFloat64))
        moving_image = image_from_volume_node(moving)
        reference = sitk.GetArrayFromImage(sitk.Resample(moving_image, theirs, field, sitk.sitkLinear, 0.0))
        # inside the field, off its outer voxels (ITK and VTK extrapolate differently there), and where
        # x + d(x) falls inside the moving volume, off its outer voxels (they differ within half a voxel)
        domain = (sitk.GetArrayFromImage(sitk.Resample(_interior(result.field), theirs, sitk.Transform(),
                                                       sitk.sitkNearestNeighbor, 0))
                  * sitk.GetArrayFromImage(sitk.Resample(_interior(moving_image), theirs, field,
                                                         sitk.sitkNearestNeighbor, 0)))
        difference = np.abs(sitk.GetArrayFromImage(theirs) - reference)[domain > 0]
        assert difference.size > 1000, "the hardened volume does not overlap the fixed grid"
        assert difference.max() < 1e-3 * reference.max(), f"MRML's warp differs by {difference.max()}"
    finally:
        _remove(scene, fixed, moving, run.warped_node, run.transform_node, hardened)


def scenario_registration_sequence(scene, sequences_logic=None) -> None:
    """Every frame of a fixed sequence registered to the moving frame 0: warped sequence and a
    sequence of grid transforms with the same index values, MSE reduced, inputs unchanged."""
    from us3dmrml.registration import register_sequence_node

    shifts = [(0.0, 0.0, 0.0), (0.8, 0.0, 0.0), (1.6, -0.4, 0.0)]
    sequence, browser = add_sequence(scene, name="fixed frames", arrays=[blob_volume(shift) for shift in shifts],
                                     index_values=[f"{t / 6:.3f}" for t in range(len(shifts))])
    moving = add_volume(scene, blob_volume(shifts[0]), "moving (exhale)")
    before = [volume_hash(sequence.GetNthDataNode(n)) for n in range(3)] + [volume_hash(moving)]
    seen = []
    run = register_sequence_node(scene, sequence, moving, RegistrationSettings(method="demons", device="cpu"),
                                 progress=lambda d, t: seen.append(d), browser_node=browser,
                                 sequences_logic=sequences_logic)
    try:
        assert seen == [0, 1, 2, 3]  # 0: the inputs are ready
        for output in (run.warped_node, run.transform_node):
            assert [output.GetNthIndexValue(n) for n in range(3)] == [sequence.GetNthIndexValue(n) for n in range(3)]
            assert browser.IsSynchronizedSequenceNodeID(output.GetID())
        assert run.transform_node.GetNthDataNode(2).IsA("vtkMRMLGridTransformNode")
        assert all(r.mse_after < r.mse_before for r in run.results[1:])
        assert [volume_hash(sequence.GetNthDataNode(n)) for n in range(3)] + [volume_hash(moving)] == before
    finally:
        proxies = [browser.GetProxyNode(s) for s in (sequence, run.warped_node, run.transform_node)]
        _remove(scene, *proxies, browser, run.warped_node, run.transform_node, sequence, moving)


def scenario_registration_cancel_leaves_scene_unchanged(scene) -> None:
    from us3dmrml.registration import register_sequence_node

    sequence, browser = add_sequence(scene, frames=4)
    moving = add_volume(scene, speckle_volume(), "moving")
    count = scene.GetNumberOfNodes()
    done = cancelled_after_two_frames(lambda progress, cancel: register_sequence_node(
        scene, sequence, moving, RegistrationSettings(method="demons", device="cpu"), progress, cancel,
        browser_node=browser))
    try:
        assert done == [1, 2] and scene.GetNumberOfNodes() == count
    finally:
        _remove(scene, browser, sequence, moving)


def scenario_voxelmorph_tracks_simulated_breathing(scene) -> None:
    """The bundled VoxelMorph on a simulated breathing sequence (oblique node geometry): each frame's
    field, taken back to voxels, is well under the true motion's size; MSE drops; no folding."""
    from us3d.phantom import simulate_sequence
    from us3d.registration.fields import field_array
    from us3d.training.registration import truth_in_voxels
    from us3dmrml.registration import register_sequence_node

    phantom = simulate_sequence(3, seed=9150)
    sequence, browser = add_sequence(scene, name="breathing", arrays=list(phantom.bmode))
    moving = add_volume(scene, phantom.bmode[0], "exhale")
    run = register_sequence_node(scene, sequence, moving, RegistrationSettings(device="cpu"))
    try:
        lps_to_index = np.linalg.inv(np.reshape(DIRECTION_LPS, (3, 3))) / np.asarray(SPACING)[:, None]
        for t in (1, 2):
            result = run.results[t]
            found = field_array(result.field) @ lps_to_index.T  # (k, j, i, [i, j, k]) voxels
            truth = np.moveaxis(truth_in_voxels(phantom.displacement[t], phantom.spacing)[::-1], 0, -1)
            error = np.linalg.norm(found - truth, axis=-1).mean()
            motion = np.linalg.norm(truth, axis=-1).mean()
            assert error < 0.5 * motion, f"frame {t}: error {error:.2f} voxels for motion {motion:.2f}"
            assert result.mse_after < result.mse_before and result.folding < 1e-3
    finally:
        _remove(scene, browser.GetProxyNode(sequence), browser, run.warped_node, run.transform_node, sequence, moving)


#: (scenario, needs the sequences logic) for USRegistration's self-test.
REGISTRATION_SCENARIOS = ((scenario_grid_transform_reproduces_warp, False), (scenario_registration_sequence, True),
                          (scenario_registration_cancel_leaves_scene_unchanged, False),
                          (scenario_voxelmorph_tracks_simulated_breathing, False))


def _wait(run, seconds: float = 300.0) -> None:
    """Poll a background run as the module's QTimer does, until it is done."""
    end = time.monotonic() + seconds
    while not run.poll():
        if time.monotonic() > end:
            run.cancel()
            raise AssertionError("the background run did not finish in time")
        time.sleep(0.1)


def _expect_failure(job, finish, message: str) -> None:
    """A background job whose worker fails: `finish()` raises one InputError naming `message`, and the
    job's temporary folder is gone."""
    _wait(job.run)
    try:
        finish()
    except InputError as error:
        assert message in str(error), str(error)
    else:
        raise AssertionError("a failing worker did not raise")
    assert not job.run.folder.exists(), "the failed run left its temporary folder"


def _node_count(scene) -> int:
    return scene.GetNumberOfNodes()


def scenario_background_volume_and_sequence(scene, sequences_logic=None) -> None:
    """A child process despeckles a volume and a sequence: the same output as in this process, with
    per-frame progress, and no temporary folder left behind."""
    settings = ObnlmSettings(search_radius=2)
    array = speckle_volume()
    node = add_volume(scene, array)
    job = start_despeckle(node, settings, "cpu")
    _wait(job.run)
    run = finish_despeckle(scene, job)
    sequence, browser = add_sequence(scene, frames=3)
    job = start_despeckle(sequence, settings, "cpu", sequence=True, browser_node=browser)
    _wait(job.run)
    progress = job.run.progress()
    frames = finish_despeckle(scene, job, sequences_logic)
    try:
        expected = us3d.despeckle(array.astype(np.float32), **settings.arguments(), device="cpu")
        np.testing.assert_allclose(array_from_volume_node(run.output_node), expected, atol=1e-4)
        np.testing.assert_allclose(ijk_to_ras(run.output_node), ijk_to_ras(node), atol=1e-9)
        assert len(run.smpi) == 1 and run.device == "cpu" and run.seconds_per_frame[0] > 0
        assert progress == (3, 3), progress
        out = frames.output_node
        assert [out.GetNthIndexValue(n) for n in range(3)] == [sequence.GetNthIndexValue(n) for n in range(3)]
        assert browser.IsSynchronizedSequenceNodeID(out.GetID()) and len(frames.smpi) == 3
        assert not job.run.folder.exists(), "the temporary folder was left behind"
    finally:
        _remove(scene, node, run.output_node, browser.GetProxyNode(frames.output_node), browser.GetProxyNode(sequence),
                browser, frames.output_node, sequence)


def scenario_background_cancel_and_failure(scene) -> None:
    """Cancel kills the child and leaves the scene and the disk as they were; a failing child gives
    its own error message and leaves nothing either."""
    sequence, browser = add_sequence(scene, frames=5)
    before = _node_count(scene)
    try:
        job = start_despeckle(sequence, ObnlmSettings(search_radius=7, block_radius=3), "cpu", sequence=True)
        job.run.cancel()
        assert job.run.process.returncode is not None and not job.run.folder.exists()
        assert _node_count(scene) == before
        node = add_volume(scene, speckle_volume())
        before = _node_count(scene)
        job = start_despeckle(node, UnetSettings("no-such-model.pt"), "cpu")
        _expect_failure(job, lambda: finish_despeckle(scene, job), "no-such-model.pt")
        assert _node_count(scene) == before
    finally:
        _remove(scene, browser.GetProxyNode(sequence), browser, sequence, scene.GetFirstNodeByName("US volume"))


def scenario_background_registration(scene, sequences_logic=None) -> None:
    """A child process registers a moving volume to a fixed volume and to every frame of a sequence:
    the same kinds of nodes as in this process, figures per frame, no temporary folder left; a
    failing worker's message reaches the caller and the scene stays as it was."""
    from us3dmrml.registration import finish_registration, start_registration

    settings = RegistrationSettings(method="translation", refine_steps=4, device="cpu")
    shifts = [(0.0, 0.0, 0.0), (0.8, 0.0, 0.0)]
    sequence, browser = add_sequence(scene, name="fixed frames", arrays=[blob_volume(shift) for shift in shifts],
                                     index_values=["exhale", "inhale"], index_type="text")
    moving = add_volume(scene, blob_volume(shifts[0]), "moving (exhale)")
    fixed = add_volume(scene, blob_volume(shifts[1]), "fixed")
    job = start_registration(fixed, moving, settings)
    _wait(job.run)
    pair = finish_registration(scene, job)
    job = start_registration(sequence, moving, settings, sequence=True, browser_node=browser)
    _wait(job.run)
    frames = finish_registration(scene, job, sequences_logic)
    try:
        assert pair.warped_node.IsA("vtkMRMLScalarVolumeNode") and pair.transform_node.IsA("vtkMRMLGridTransformNode")
        assert len(pair.results) == 1 and pair.results[0].mse_after < pair.results[0].mse_before
        for output in (frames.warped_node, frames.transform_node):
            assert [output.GetNthIndexValue(n) for n in range(2)] == ["exhale", "inhale"]
            assert browser.IsSynchronizedSequenceNodeID(output.GetID())
        assert len(frames.results) == 2 and frames.results[1].mse_after < frames.results[1].mse_before
        assert not job.run.folder.exists(), "the temporary folder was left behind"
        count = scene.GetNumberOfNodes()
        job = start_registration(fixed, moving, RegistrationSettings(model="no-such-model.pt", device="cpu"))
        _expect_failure(job, lambda: finish_registration(scene, job), "no-such-model.pt")
        assert scene.GetNumberOfNodes() == count
    finally:
        proxies = [browser.GetProxyNode(s) for s in (sequence, frames.warped_node, frames.transform_node)]
        _remove(scene, *proxies, browser, frames.warped_node, frames.transform_node, sequence, moving, fixed,
                pair.warped_node, pair.transform_node)


# --- Sample data ---------------------------------------------------------------------------------

def scenario_sample_data(scene, sequences_logic=None) -> None:
    """The sample data load: the simulated liver sequence with its true motion in one browser
    (simulated once into the cache and reused, no half-written folder) and the real spine volume."""
    import tempfile
    from pathlib import Path

    from us3dmrml.sampledata import liver_phantom_folder, load_liver_phantom, load_spine_volume

    with tempfile.TemporaryDirectory() as cache:
        browser, bmode, truth = load_liver_phantom(scene, cache, sequences_logic, frames=3)
        spine = load_spine_volume(scene)
        try:
            assert bmode.GetNumberOfDataNodes() == 3 and truth.GetNumberOfDataNodes() == 3
            assert [truth.GetNthIndexValue(n) for n in range(3)] == [bmode.GetNthIndexValue(n) for n in range(3)]
            assert browser.GetMasterSequenceNode() is bmode and browser.IsSynchronizedSequenceNodeID(truth.GetID())
            moved = truth.GetNthDataNode(2).GetTransformFromParent().GetDisplacementGrid()
            assert truth.GetNthDataNode(2).IsA("vtkMRMLGridTransformNode")
            assert max(abs(v) for v in moved.GetScalarRange()) > 0.5, "frame 2's true motion is under 0.5 mm"
            assert array_from_volume_node(bmode.GetNthDataNode(0)).shape == (32, 128, 128)
            assert array_from_volume_node(spine).ndim == 3 and array_from_volume_node(spine).max() > 0
            folder = liver_phantom_folder(cache, 3)
            stamp = (folder / "bmode.seq.nrrd").stat().st_mtime_ns
            assert liver_phantom_folder(cache, 3) == folder and (folder / "bmode.seq.nrrd").stat().st_mtime_ns == stamp
            assert sorted(p.name for p in Path(cache).iterdir()) == [folder.name], "a temporary folder was left"
        finally:
            proxies = [browser.GetProxyNode(s) for s in (bmode, truth)]
            _remove(scene, *[p for p in proxies if p is not None], browser, bmode, truth, spine)


DESPECKLE_SCENARIOS += ((scenario_background_volume_and_sequence, True), (scenario_background_cancel_and_failure, False),
                        (scenario_sample_data, True))
REGISTRATION_SCENARIOS += ((scenario_background_registration, True),)
