"""The 3D dense U-Net: architecture, inference on any shape, tiling, 4D input, model files."""

import json
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from us3d.despeckling import Cancelled, UnetSettings, despeckle
from us3d.errors import InputError
from us3d.io import VolumeSequence
from us3d.models import bundle
from us3d.models.bundle import load_model, save_model
from us3d.models.inference import predict, run_with_fallback
from us3d.models.unet import DenseUNet3D, for_inference

CPU = torch.device("cpu")


def _random_model(seed: int = 0) -> DenseUNet3D:
    """A model whose output is not the identity (the head starts at zero)."""
    torch.manual_seed(seed)
    model = DenseUNet3D().eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "random.pt"
    save_model(_random_model(), path, {"target": "test"})
    return path


class LocalConv(torch.nn.Module):
    """A 3x3x3 mean filter: its output at a voxel depends on its neighbours only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)


def test_pooling_keeps_elevation_and_blocks_are_dense():
    model = DenseUNet3D()
    assert model.pool.kernel_size == (1, 2, 2)
    assert all(up.stride == (1, 2, 2) for up in model.ups)
    block = model.encoders[1]
    # each convolution sees the block input plus every earlier output in the block
    assert [c.in_channels for c in block.convs] == [8, 8 + 8]
    with torch.inference_mode():
        assert model(torch.zeros(2, 1, 3, 32, 48)).shape == (2, 1, 3, 32, 48)


@pytest.mark.parametrize("shape", [(5, 37, 50), (1, 16, 16), (3, 130, 17)])
def test_any_shape_is_padded_and_cropped_back(model_file, shape):
    module = load_model(str(model_file)).module
    volume = np.random.default_rng(1).gamma(2.0, 30.0, shape).astype(np.float32)
    out = predict(module, volume[None], CPU)[0]
    assert out.shape == shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.allclose(out, volume)


def test_output_follows_gain_and_offset_of_the_input(model_file):
    module = load_model(str(model_file)).module
    volume = np.random.default_rng(2).gamma(2.0, 30.0, (4, 32, 32)).astype(np.float32)
    out = predict(module, volume[None], CPU)[0]
    scaled = predict(module, (3.0 * volume + 20.0)[None], CPU)[0]
    np.testing.assert_allclose(scaled, 3.0 * out + 20.0, rtol=1e-4, atol=1e-2)


def test_tiles_are_blended_without_seams():
    module = torch.jit.script(LocalConv())
    volume = np.random.default_rng(3).normal(size=(1, 20, 96, 80)).astype(np.float32)  # no padding
    whole = predict(module, volume, CPU, tile=(64, 256, 256))
    tiled = predict(module, volume, CPU, tile=(16, 48, 32))
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_predict_runs_in_the_precision_of_the_module():
    """A module cast to bfloat16 gets bfloat16 frames (the benchmark's bf16 rows) and float32 comes back."""
    torch.manual_seed(0)
    module = torch.nn.Conv3d(1, 1, 3, padding=1)
    volume = np.random.default_rng(6).gamma(2.0, 30.0, (1, 4, 16, 16)).astype(np.float32)
    full = predict(module, volume, CPU)
    low = torch.nn.Conv3d(1, 1, 3, padding=1)
    low.load_state_dict(module.state_dict())
    half = predict(low.to(torch.bfloat16), volume, CPU)
    assert half.dtype == np.float32 and not np.array_equal(half, full)
    np.testing.assert_allclose(half, full, atol=0.02 * float(np.ptp(full)))


def test_the_rebuilt_network_gives_the_scripted_ones_output(model_file):
    """On the CPU the model file's network runs rebuilt as DenseUNet3D (its convolutions in oneDNN)."""
    scripted = load_model(str(model_file)).module
    rebuilt = for_inference(scripted, bfloat16=False)
    assert type(rebuilt) is DenseUNet3D and next(rebuilt.parameters()).dtype == torch.float32
    volume = np.random.default_rng(7).gamma(2.0, 30.0, (1, 6, 48, 32)).astype(np.float32)
    np.testing.assert_allclose(predict(rebuilt, volume, CPU), predict(scripted, volume, CPU), atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script
        other = torch.jit.script(LocalConv())
    assert for_inference(other) is other


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bfloat16 convolutions here")
@pytest.mark.parametrize("name", ["unet-obnlm", "unet-sim"])
def test_bfloat16_inference_stays_within_45_db_of_float32(name):
    """Issue 15's bar for running the bundled U-Nets in bfloat16 on the CPU, on a simulated B-mode volume."""
    from us3d import metrics
    from us3d.phantom import ImagingSetup, simulate_volume

    loaded = load_model(name)
    volume = simulate_volume(3, ImagingSetup(shape=(8, 64, 64))).bmode.astype(np.float32)
    full = predict(for_inference(loaded.module, bfloat16=False), volume, CPU, mapping=loaded.input_mapping)
    half_module = for_inference(loaded.module, bfloat16=True)
    assert next(half_module.parameters()).dtype == torch.bfloat16
    half = predict(half_module, volume, CPU, mapping=loaded.input_mapping)
    assert metrics.psnr(half[0], full[0]) >= 45.0


def test_tiled_u_net_is_close_to_whole_volume(model_file):
    module = load_model(str(model_file)).module
    volume = np.random.default_rng(4).gamma(2.0, 30.0, (1, 8, 96, 96)).astype(np.float32)
    whole = predict(module, volume, CPU)
    tiled = predict(module, volume, CPU, tile=(8, 64, 64))
    error = np.sqrt(np.mean((tiled - whole) ** 2)) / volume.std()
    assert error < 0.1


def test_sequence_frames_match_single_volume_runs(model_file, tmp_path):
    frames = np.random.default_rng(5).gamma(2.0, 30.0, (3, 4, 32, 48)).astype(np.float32)
    sequence = VolumeSequence(frames, (0.4, 0.3, 0.8), origin=(1.0, 2.0, 3.0), index_values=["0", "0.5", "1"])
    seen = []
    result = despeckle(sequence, UnetSettings(str(model_file)), "cpu", progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert result.index_values == ["0", "0.5", "1"] and result.origin == (1.0, 2.0, 3.0)
    module = for_inference(load_model(str(model_file)).module)  # what despeckle runs on the CPU
    np.testing.assert_allclose(result.frames[1], predict(module, frames[1:2], CPU)[0], atol=1e-4)
    calls = iter([False, False, True])
    with pytest.raises(Cancelled):
        despeckle(sequence, UnetSettings(str(model_file)), "cpu", cancel=lambda: next(calls))


def test_volume_keeps_geometry(model_file):
    image = sitk.GetImageFromArray(np.random.default_rng(6).integers(0, 255, (4, 20, 30)).astype(np.uint8))
    image.SetSpacing((0.3, 0.4, 0.9))
    image.SetOrigin((5.0, -3.0, 2.0))
    result = despeckle(image, UnetSettings(str(model_file)), "cpu")
    assert result.GetSpacing() == image.GetSpacing() and result.GetOrigin() == image.GetOrigin()
    assert result.GetPixelID() == sitk.sitkFloat32


def test_missing_cuda_is_a_clear_error(model_file, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA"):
        despeckle(sitk.Image(16, 16, 2, sitk.sitkFloat32), UnetSettings(str(model_file)), "cuda")


def test_cuda_out_of_memory_falls_back_to_smaller_tiles_then_cpu():
    tried = []

    def attempt(device, tile, batch):
        tried.append((device.type, tile, batch))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("out of memory")
        return np.zeros(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_with_fallback(attempt, torch.device("cuda"), (64, 256, 256), 4)
    assert [t[2] for t in tried[:3]] == [4, 2, 1]
    assert tried[3][1] == (32, 128, 128) and tried[4][1] == (32, 64, 64)
    assert tried[-1][0] == "cpu" and len(caught) == len(tried) - 1
    assert "CPU" in str(caught[-1].message)


def test_junk_and_foreign_model_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a TorchScript model"):
        load_model(str(junk))
    foreign = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.script(LocalConv()), str(foreign))
    with pytest.raises(InputError, match="no us3d metadata"):
        load_model(str(foreign))
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"))
    with pytest.raises(InputError, match="unknown model"):
        load_model("unet-nonexistent")


def test_tampered_weights_are_refused(tmp_path):
    path = tmp_path / "tampered.pt"
    save_model(_random_model(), path, {})
    module = torch.jit.load(str(path))
    extra = {"metadata.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    with torch.no_grad():
        module.head.bias.add_(1.0)
    torch.jit.save(module, str(path), _extra_files=extra)
    with pytest.raises(InputError, match="do not match the sha256 recorded"):
        load_model(str(path))


def test_manifest_hash_mismatch_is_refused(tmp_path, monkeypatch):
    save_model(_random_model(), tmp_path / "m.pt", {})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": [{"name": "unet-x", "file": "m.pt", "sha256": "0" * 64,
                                                "target": "obnlm"}]}))
    monkeypatch.setattr(bundle, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(bundle, "MANIFEST", manifest)
    with pytest.raises(InputError, match="does not match the sha256 in manifest.json"):
        load_model("unet-x")
    manifest.write_text(json.dumps({"models": [{"name": "unet-x", "file": "m.pt",
                                                "sha256": bundle.file_sha256(tmp_path / "m.pt"),
                                                "target": "obnlm"}]}))
    assert load_model("unet-x").name == "unet-x"


@pytest.mark.parametrize("name", ["unet-obnlm", "unet-sim"])
def test_bundled_models_load_by_name(name):
    model = load_model(name)
    assert model.metadata["target"] == {"unet-obnlm": "obnlm", "unet-sim": "clean"}[name]
    assert (bundle.MODELS_DIR / f"{name}.md").exists()


def test_tiles_cover_every_axis_with_little_overlap_work():
    """Issue 15: on a 128x512x512 volume the tiles cost at most 1.3x the untiled work per voxel
    (three 256-voxel tiles per in-plane axis cost 3.4x), and every layout covers its axis with
    neighbours overlapping by at least the requested overlap."""
    from us3d.models.inference import DEFAULT_TILE, TILE_OVERLAP, tile_layout

    work = 1.0
    for size, tile, overlap, multiple in zip((128, 512, 512), DEFAULT_TILE, TILE_OVERLAP, (1, 16, 16)):
        length, starts = tile_layout(size, tile, overlap, multiple)
        work *= length * len(starts) / size
    assert work <= 1.3, work
    for size in range(10, 700, 7):
        for tile, overlap, multiple in ((64, 8, 1), (256, 32, 16), (48, 12, 16)):
            length, starts = tile_layout(size, tile, overlap, multiple)
            assert starts[0] == 0 and starts[-1] + length == size and length <= max(size, 0)
            assert length <= tile + overlap + multiple - 1 or len(starts) == 1
            assert all(b - a <= length - overlap for a, b in zip(starts, starts[1:])), (size, tile, starts, length)


def test_an_in_plane_network_computes_each_slice_from_its_own_slice_and_tiles_without_overlap_in_k():
    """With 1x3x3 kernels every output slice depends on its input slice alone (what a slice-wise
    OBNLM target needs), so tiles along k need no overlap: tiled and whole give the same output."""
    torch.manual_seed(3)
    model = DenseUNet3D((4, 8, 8, 8, 8), (2, 4, 4, 4, 4), kernel=(1, 3, 3)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    scripted = torch.jit.script(model)
    volume = np.random.default_rng(4).gamma(2.0, 30.0, (12, 32, 32)).astype(np.float32)
    changed = volume.copy()
    changed[5] = np.random.default_rng(5).permutation(volume[5].ravel()).reshape(volume[5].shape)  # same statistics
    out, out_changed = (predict(scripted, v[None], CPU)[0] for v in (volume, changed))
    moved = np.abs(out_changed - out).max(axis=(1, 2))
    assert moved[5] > 1.0 and np.all(np.delete(moved, 5) < 1e-3)
    tiled = predict(scripted, volume[None], CPU, tile=(4, 32, 32))[0]
    np.testing.assert_allclose(tiled, out, atol=1e-3)
