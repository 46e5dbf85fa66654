import numpy as np
import pytest

from us3d import metrics
from us3d.errors import InputError


def test_smpi_hand_computed():
    original = np.array([0.0, 2.0, 4.0, 6.0])  # mean 3, var 5
    filtered = np.array([2.0, 3.0, 4.0, 5.0])  # mean 3.5, var 1.25
    # paper's scale: Q = 1 + |3.5 - 3| / sqrt(5); sqrt(1.25 / 5) = 0.5
    assert metrics.smpi(original, filtered) == pytest.approx((1 + 0.5 / np.sqrt(5)) * 0.5)
    # grey levels: Q = 1 + |3.5 - 3| = 1.5
    assert metrics.smpi_grey_levels(original, filtered) == pytest.approx(0.75)


def test_smpi_on_the_papers_scale_ignores_the_grey_level_scale():
    rng = np.random.default_rng(0)
    original = rng.gamma(2.0, 20.0, 1000)
    filtered = 0.8 * original + 0.2 * original.mean() + 3.0
    value = metrics.smpi(original, filtered)
    assert metrics.smpi(original * 0.01 + 7, filtered * 0.01 + 7) == pytest.approx(value)
    assert metrics.smpi_grey_levels(original * 0.01, filtered * 0.01) != pytest.approx(
        metrics.smpi_grey_levels(original, filtered))


def test_smpi_with_mask_uses_only_the_region():
    original = np.array([0.0, 2.0, 4.0, 6.0, 100.0])
    filtered = np.array([2.0, 3.0, 4.0, 5.0, -50.0])
    mask = np.array([True, True, True, True, False])
    assert metrics.smpi(original, filtered, mask) == pytest.approx((1 + 0.5 / np.sqrt(5)) * 0.5)
    assert metrics.smpi_grey_levels(original, filtered, mask) == pytest.approx(0.75)


def test_enl_and_ssi_hand_computed():
    v = np.array([1.0, 3.0])  # mean 2, var 1
    assert metrics.enl(v) == pytest.approx(4.0)
    original = np.array([1.0, 3.0])  # std/mean = 0.5
    filtered = np.array([1.5, 2.5])  # std/mean = 0.25
    assert metrics.speckle_suppression_index(original, filtered) == pytest.approx(0.5)


def test_cnr_hand_computed():
    volume = np.array([1.0, 3.0, 10.0, 12.0])
    a = np.array([True, True, False, False])
    b = ~a
    # means 2 and 11, variances 1 and 1
    assert metrics.cnr(volume, a, b) == pytest.approx(9 / np.sqrt(2))


def test_gcnr_limits_and_half_overlap():
    a = np.array([True] * 4 + [False] * 4)
    separable = np.array([0, 0, 1, 1, 5, 5, 6, 6], float)
    assert metrics.gcnr(separable, a, ~a) == pytest.approx(1.0)
    same = np.array([0, 1, 2, 3, 0, 1, 2, 3], float)
    assert metrics.gcnr(same, a, ~a) == pytest.approx(0.0)
    # a: {0,0,1,1}, b: {1,1,2,2}: overlap in the bin of 1 is min(0.5, 0.5) = 0.5
    half = np.array([0, 0, 1, 1, 1, 1, 2, 2], float)
    assert metrics.gcnr(half, a, ~a, bins=3) == pytest.approx(0.5)


def test_full_reference_metrics():
    reference = np.zeros((8, 8, 8))
    reference[2:6, 2:6, 2:6] = 10.0
    noisy = reference + 1.0  # error of 1 everywhere
    assert metrics.mse(noisy, reference) == pytest.approx(1.0)
    assert metrics.psnr(noisy, reference) == pytest.approx(20.0)  # 10 log10(10^2 / 1)
    assert metrics.ssim(reference, reference) == pytest.approx(1.0)
    assert metrics.ssim(noisy, reference) < 1.0


@pytest.mark.parametrize("call", [
    lambda: metrics.smpi(np.ones(5), np.arange(5.0)),
    lambda: metrics.enl(np.full(4, 3.0)),
    lambda: metrics.cnr(np.ones(4), np.array([1, 1, 0, 0], bool), np.array([0, 0, 1, 1], bool)),
    lambda: metrics.gcnr(np.arange(4.0), np.zeros(4, bool), np.ones(4, bool)),
    lambda: metrics.enl(np.array([])),
    lambda: metrics.psnr(np.ones(4), np.ones(4)),
    lambda: metrics.smpi(np.arange(4.0), np.arange(5.0)),
    lambda: metrics.enl(np.array([1.0, np.nan])),
])
def test_degenerate_input_is_a_clear_error_not_nan(call):
    with pytest.raises(InputError):
        call()
