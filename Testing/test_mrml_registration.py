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
