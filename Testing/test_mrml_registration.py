"""The MRML layer of USRegistration on Slicer's own MRML (slicer-core), with a real scene."""

import pytest

slicer = pytest.importorskip("slicer")

from us3dmrml import selftests  # noqa: E402


def test_grid_transform_applied_by_mrml_reproduces_the_warped_volume(scene):
    selftests.scenario_grid_transform_reproduces_warp(scene)


def test_sequence_of_fixed_frames(scene, sequences_logic):
    selftests.scenario_registration_sequence(scene, sequences_logic)


def test_cancel_after_frame_2_leaves_nothing(scene):
    selftests.scenario_registration_cancel_leaves_scene_unchanged(scene)


def test_bundled_voxelmorph_tracks_simulated_breathing(scene):
    selftests.scenario_voxelmorph_tracks_simulated_breathing(scene)


def test_the_mrml_layer_registers_sequences_through_the_one_us3d_implementation(scene, sequences_logic,
                                                                                 monkeypatch):
    """us3dmrml converts nodes; the frame loop is us3d's Registrar.register_sequence, called once."""
    from us3d.registration.pairs import Registrar

    calls = []
    original = Registrar.register_sequence

    def counted(self, *args, **kwargs):
        calls.append(self.settings)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Registrar, "register_sequence", counted)
    selftests.scenario_registration_sequence(scene, sequences_logic)
    assert len(calls) == 1 and calls[0].method == "demons"


def test_background_registration_of_a_volume_and_a_sequence(scene, sequences_logic):
    selftests.scenario_background_registration(scene, sequences_logic)


def test_per_frame_figures_become_a_slicer_plot(scene):
    import numpy as np

    from us3dmrml.plots import frame_plot

    chart = frame_plot(scene, "liver to frames", {"MSE before": [0.0, 0.03, 0.05], "MSE after": [0.0, 0.01, 0.02]},
                       "MSE")
    try:
        assert chart.GetNumberOfPlotSeriesNodes() == 2 and chart.GetTitle() == "liver to frames"
        series = chart.GetNthPlotSeriesNode(1)
        table = series.GetTableNode().GetTable()
        assert series.GetYColumnName() == "MSE after" and table.GetNumberOfRows() == 3
        values = [table.GetColumnByName("MSE after").GetValue(n) for n in range(3)]
        np.testing.assert_allclose(values, [0.0, 0.01, 0.02])
    finally:
        table_node = chart.GetNthPlotSeriesNode(0).GetTableNode()
        for n in reversed(range(chart.GetNumberOfPlotSeriesNodes())):
            scene.RemoveNode(chart.GetNthPlotSeriesNode(n))
        scene.RemoveNode(chart)
        scene.RemoveNode(table_node)
