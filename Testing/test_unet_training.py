"""Training data of the despeckling U-Net: augmented crops with exact OBNLM targets, input mappings,
real sources, held-out sets."""

import warnings

import numpy as np
import pytest
import torch

from us3d.despeckling import ObnlmSettings, despeckle_array
from us3d.models.inference import normalisation, predict
from us3d.models.unet import DenseUNet3D
from us3d.training.data import TrainingVolume, read_real, rf_to_bmode, transposed
from us3d.training.despeckle import INPUT_MAPPING, TrainingSettings, training_pair

CPU = torch.device("cpu")


def _speckle(shape, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.rayleigh(40.0, shape), 0, 255).astype(np.float32)


def test_obnlm_pair_is_the_exact_obnlm_output_of_the_augmented_crop():
    settings = TrainingSettings(crop=(8, 32, 32))
    volume = TrainingVolume("speckle", _speckle((12, 80, 70)))
    x, y = training_pair(volume, "obnlm", settings, ObnlmSettings(), np.random.default_rng(1))
    assert x.shape == y.shape == (8, 32, 32)
    # obnlm-range: the crop's min and max map to -/+ 127.5 / 64 whatever the grey levels were
    assert x.min() == pytest.approx(-127.5 / 64, abs=1e-5) and x.max() == pytest.approx(127.5 / 64, abs=1e-5)
    # undo the mapping with any (offset, scale): OBNLM is invariant to them, so its output on the
    # normalised crop, normalised the same way, is the target
    np.testing.assert_allclose(despeckle_array(x.astype(np.float64), ObnlmSettings(), "cpu"), y, atol=1e-4)
    assert not np.allclose(x, y)


def test_clean_pair_crops_input_and_truth_alike():
    settings = TrainingSettings(crop=(4, 16, 16), zoom_range=(1.0, 1.0))
    truth = np.arange(6 * 20 * 24, dtype=np.float32).reshape(6, 20, 24)
    volume = TrainingVolume("ramp", truth + 5.0, truth)
    x, y = training_pair(volume, "clean", settings, ObnlmSettings(), np.random.default_rng(2))
    offset, scale = normalisation(x, INPUT_MAPPING["clean"])
    assert offset == pytest.approx(0.0, abs=1e-5) and scale == pytest.approx(1.0, abs=1e-5)  # already standardised
    np.testing.assert_allclose(x - y, x[0, 0, 0] - y[0, 0, 0], atol=1e-4)  # input = truth + a constant


def test_a_2d_frame_is_mirrored_to_the_crop_depth():
    settings = TrainingSettings(crop=(8, 32, 32))
    volume = TrainingVolume("frame", _speckle((1, 60, 50)), valid=np.ones((1, 60, 50), bool))
    x, y = training_pair(volume, "obnlm", settings, ObnlmSettings(), np.random.default_rng(3))
    assert x.shape == (8, 32, 32) and np.allclose(x, x[:1]) and np.allclose(y, y[:1])


@pytest.mark.parametrize("mapping", ["standardise", "obnlm-range"])
def test_an_identity_model_returns_the_input_under_either_mapping(mapping):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.script(DenseUNet3D().eval())  # the head starts at zero: output = input
    volume = _speckle((3, 20, 36), 4) * 0.5 + 7.0
    np.testing.assert_allclose(predict(module, volume[None], CPU, mapping=mapping)[0], volume, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="input mapping"):
        normalisation(volume, "minmax")


def test_rf_lines_become_8_bit_b_mode():
    samples = np.arange(2000)
    amplitude = np.where(samples < 1000, 1.0, 0.01)  # 40 dB step along the line
    rf = (amplitude * np.sin(2 * np.pi * samples / 8.0))[None, None, :].repeat(3, 1)
    bmode = rf_to_bmode(rf, axis=2, dynamic_range_db=60.0, decimation=2)
    assert bmode.shape == (1, 3, 1000) and bmode.min() >= 0 and bmode.max() <= 255
    bright, dark = np.median(bmode[..., 100:400]), np.median(bmode[..., 600:900])
    assert bright == pytest.approx(255, abs=3) and bright - dark == pytest.approx(40 / 60 * 255, abs=5)


def test_real_sources_read_as_k_j_i_b_mode():
    frame = read_real("BkCurvilinearScanConvertedData.igs.mha")
    assert frame.shape == (1, 400, 600) and frame.dtype == np.float32
    mouse = read_real("MouseLiverRF.mha")
    assert mouse.shape == (4, 128, 768) and 0 <= mouse.min() and mouse.max() <= 255


def test_transposed_swaps_the_in_plane_axes():
    volume = TrainingVolume("v", _speckle((2, 5, 7)), None, np.ones((2, 5, 7), bool))
    swapped = transposed(volume)
    assert swapped.input.shape == (2, 7, 5) and swapped.valid.shape == (2, 7, 5)
    assert swapped.input[1, 3, 2] == volume.input[1, 2, 3] and swapped.name.endswith("(j, i swapped)")
