"""The MRML layer of USDespeckle on Slicer's own MRML (slicer-core), with a real scene."""

import pytest

slicer = pytest.importorskip("slicer")

from us3dmrml import selftests  # noqa: E402


def test_volume_keeps_geometry_and_input(scene):
    selftests.scenario_volume_keeps_geometry_and_input(scene)
    assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0  # scenario cleaned up


def test_sequence_in_sequence_out_with_proxy(scene, sequences_logic):
    selftests.scenario_sequence_in_sequence_out(scene, sequences_logic)


def test_cancel_after_frame_2_of_5_leaves_nothing(scene):
    selftests.scenario_cancel_leaves_scene_unchanged(scene)


def test_bad_inputs_are_refused(scene):
    selftests.scenario_bad_inputs_are_refused(scene)


def test_unet_volume(scene):
    selftests.scenario_unet_volume(scene)


def test_proxy_node_leads_to_its_sequence(scene, sequences_logic):
    selftests.scenario_proxy_node_leads_to_its_sequence(scene, sequences_logic)


def test_offscreen_slice_view_shows_the_volume_and_the_smoothing(scene):
    import numpy as np

    from us3d.despeckling import ObnlmSettings
    from us3dmrml.despeckle import despeckle_volume_node
    from us3dmrml.views import color_logic, render_slice, side_by_side

    colors = color_logic(scene)
    volume = selftests.add_volume(scene, selftests.speckle_volume((6, 80, 96)))
    output = despeckle_volume_node(scene, volume, ObnlmSettings(h=2.0), "cpu").output_node
    before, after = (render_slice(scene, node, window=(0.0, 255.0), size=(200, 160)) for node in (volume, output))
    assert before.shape == (160, 200, 3) and before.dtype == np.uint8
    inside = before.sum(-1) > 0
    assert 0.3 < inside.mean() < 1.0  # the volume fills part of the view, the rest is background
    # the same pixels show tissue in both views, with less speckle after despeckling
    assert np.mean(inside == (after.sum(-1) > 0)) > 0.99
    assert after[inside].std() < 0.8 * before[inside].std()
    assert side_by_side([before, after]).shape == (160, 406, 3)
    del colors


def test_text_indexed_sequence_keeps_its_index_type(scene):
    """Frames named by text (e.g. breathing phases) stay text-indexed in the output sequence."""
    from us3d.despeckling import ObnlmSettings
    from us3dmrml.despeckle import despeckle_sequence_node
    from us3dmrml.nodes import nodes_of_class

    sequence, browser = selftests.add_sequence(scene, frames=2, index_values=["exhale", "inhale"], index_type="text")
    run = despeckle_sequence_node(scene, sequence, ObnlmSettings(), "cpu", browser_node=browser)
    try:
        out = run.output_node
        assert out.GetIndexTypeAsString() == "text"
        assert [out.GetNthIndexValue(n) for n in range(2)] == ["exhale", "inhale"]
        assert browser in nodes_of_class(scene, "vtkMRMLSequenceBrowserNode")
    finally:
        for node in (run.output_node, browser, sequence):
            scene.RemoveNode(node)


def test_background_process_gives_the_same_output_with_progress(scene, sequences_logic):
    selftests.scenario_background_volume_and_sequence(scene, sequences_logic)


def test_background_cancel_and_failure_leave_nothing(scene):
    selftests.scenario_background_cancel_and_failure(scene)


def test_sample_data_load_with_their_truth(scene, sequences_logic):
    selftests.scenario_sample_data(scene, sequences_logic)
