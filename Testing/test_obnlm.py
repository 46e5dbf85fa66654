from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_obnlm import blockwise_obnlm
from us3d.errors import InputError
from us3d.filters import obnlm
from us3d.filters._obnlm_cpu import obnlm_padded
from us3d.filters._obnlm_torch import obnlm_padded_torch

DATA = Path(__file__).parent / "Data"


def test_slicewise_kernel_matches_public_implementation_exactly():
    x = np.load(DATA / "obnlm_kernel_in_M7_a3_h0.7.npy")
    expected = np.load(DATA / "obnlm_kernel_out_M7_a3_h0.7.npy")
    out = obnlm_padded(x[None], (0, 7, 7), (0, 3, 3), (1, 2, 2), (0, 1, 1), 0.7, 0.8, 1.25)[0]
    assert abs(out[67, 67] - 234.991967283012) < 1e-9
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9)


def test_torch_kernel_matches_public_implementation_exactly():
    x = torch.from_numpy(np.load(DATA / "obnlm_kernel_in_M7_a3_h0.7.npy"))[None]
    expected = np.load(DATA / "obnlm_kernel_out_M7_a3_h0.7.npy")
    out = obnlm_padded_torch(x, (0, 7, 7), (0, 3, 3), (1, 2, 2), (0, 1, 1), 0.7, 0.8, 1.25)[0].numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("search,block", [((0, 2, 2), (0, 1, 1)), ((0, 3, 2), (0, 2, 1))])
def test_slicewise_kernel_matches_plain_loops(search, block):
    x = np.random.default_rng(1).random((2, 11, 9)) * 255 + 100
    expected = blockwise_obnlm(x, search, block, (1, 2, 2), (0, 1, 1), 0.7)
    out = obnlm_padded(x, search, block, (1, 2, 2), (0, 1, 1), 0.7, 0.8, 1.25)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9)


@settings(max_examples=8, deadline=None)
@given(shape=st.tuples(st.integers(3, 7), st.integers(3, 8), st.integers(3, 8)),
       search=st.integers(1, 2), block=st.integers(1, 2), h=st.sampled_from([0.3, 0.7, 2.0]),
       seed=st.integers(0, 1000))
def test_3d_kernel_matches_plain_loops(shape, search, block, h, seed):
    x = np.random.default_rng(seed).random(shape) * 255 + 100
    args = ((search,) * 3, (block,) * 3, (2, 2, 2), (1, 1, 1))
    expected = blockwise_obnlm(x, *args, h)
    np.testing.assert_allclose(obnlm_padded(x, *args, h, 0.8, 1.25), expected, rtol=0, atol=1e-9)
    torch_out = obnlm_padded_torch(torch.from_numpy(x), *args, h, 0.8, 1.25, max_elements=200).numpy()
    np.testing.assert_allclose(torch_out, expected, rtol=0, atol=1e-9)


def test_wrapper_follows_public_wrapper_steps():
    # min-max to [0, 255] over the whole volume, +100, symmetric padding, kernel, back to input range.
    rng = np.random.default_rng(3)
    volume = rng.integers(20, 200, size=(3, 12, 10)).astype(np.uint8)
    x = (volume - volume.min()) / (volume.max() - volume.min()) * 255.0 + 100
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="symmetric")
    kernel = blockwise_obnlm(padded, (0, 2, 2), (0, 1, 1), (1, 2, 2), (0, 1, 1), 0.7)[:, 1:-1, 1:-1]
    expected = (kernel - 100) / 255 * (volume.max() - volume.min()) + volume.min()
    out = obnlm(volume, "slicewise", search_radius=2, block_radius=1, h=0.7, device="cpu")
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9)


def test_slicewise_filters_each_slice_independently():
    rng = np.random.default_rng(4)
    volume = rng.random((4, 20, 18)) * 100
    volume[:, 0, 0], volume[:, 0, 1] = 0, 100  # every slice spans the global range
    whole = obnlm(volume, "slicewise", 2, 1, device="cpu")
    for k in range(4):
        single = obnlm(volume[k:k + 1], "slicewise", 2, 1, device="cpu")
        np.testing.assert_allclose(whole[k], single[0], atol=1e-9)


def test_obnlm_reduces_speckle_and_keeps_range():
    rng = np.random.default_rng(5)
    speckle = np.abs(rng.normal(size=(6, 40, 40)) + 1j * rng.normal(size=(6, 40, 40)))
    volume = np.clip(20 * np.log10(speckle) * 4 + 150, 0, 255).astype(np.uint8)
    for mode in ("slicewise", "3d"):
        out = obnlm(volume, mode, search_radius=3, block_radius=1, h=2.0, device="cpu")
        assert out.shape == volume.shape and out.dtype == np.float64
        assert out.std() < 0.8 * volume.std()
        assert volume.min() - 1e-6 <= out.min() and out.max() <= volume.max() + 1e-6
    assert volume.flags.writeable and volume.dtype == np.uint8  # input untouched


def test_constant_volume_is_returned_unchanged():
    volume = np.full((2, 5, 5), 7, np.uint8)
    np.testing.assert_array_equal(obnlm(volume, device="cpu"), volume.astype(np.float64))


@pytest.mark.parametrize("kwargs,message", [
    (dict(block_radius=0), "block radius"),
    (dict(search_radius=0), "search radius"),
    (dict(h=0.0), "smoothing h"),
    (dict(mode="2d"), "mode"),
    (dict(device="tpu"), "device"),
])
def test_bad_parameters_raise_clear_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        obnlm(np.ones((2, 6, 6)), **kwargs)


def test_bad_volumes_raise_clear_errors():
    with pytest.raises(InputError, match="3D"):
        obnlm(np.ones((6, 6)))
    bad = np.ones((2, 6, 6))
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        obnlm(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_requested_without_gpu_is_a_clear_error():
    with pytest.raises(InputError, match="no CUDA GPU"):
        obnlm(np.random.rand(2, 8, 8), device="cuda")


def test_an_intensity_range_replaces_the_volumes_own_minimum_and_maximum():
    volume = np.random.default_rng(5).rayleigh(30.0, (2, 16, 14)) + 40.0
    own = (float(volume.min()), float(volume.max()))
    np.testing.assert_array_equal(obnlm(volume, intensity_range=own, device="cpu"), obnlm(volume, device="cpu"))
    # the crop of a volume with a bright reflector: filtered as inside that volume, not on its own
    whole = np.concatenate([volume, np.full((1, 16, 14), 900.0)])
    inside = obnlm(whole, device="cpu")[:2]  # slice-wise: the slices do not mix
    np.testing.assert_allclose(obnlm(volume, intensity_range=(own[0], 900.0), device="cpu"), inside, atol=1e-9)
    assert np.abs(inside - obnlm(volume, device="cpu")).max() > 0.1
    with pytest.raises(InputError, match="does not contain"):
        obnlm(volume, intensity_range=(own[0] + 1, own[1]))


def test_the_kernels_exponential_matches_numpy_down_to_the_subnormals():
    from us3d.filters._obnlm_cpu import _exp_nonpositive

    values = -np.concatenate([np.random.default_rng(6).random(20000) * 760, [0.0, 1e-300, 708.4, 745.1, 745.2, 800]])
    out, scratch = np.empty_like(values), np.empty(2 * values.size)
    _exp_nonpositive(values, out, scratch)
    expected = np.exp(values)
    normal = expected > np.finfo(np.float64).tiny
    np.testing.assert_allclose(out[normal], expected[normal], rtol=1e-15, atol=0)
    np.testing.assert_allclose(out[~normal], expected[~normal], rtol=0, atol=1e-323)
