"""The despeckling methods compared in the benchmark: ours and the peers a Slicer or Python user
would otherwise reach for, each as volume (k, j, i) float32 + spacing (i, j, k) mm -> float32.

Peers, with the settings used (documented in the report):
- scikit-image `denoise_nl_means` in 3D (fast mode, 3x3x3 patches, search distance 3, h = 0.8 sigma
  as its documentation suggests; sigma from a robust MAD of neighbouring-voxel differences, because
  `estimate_sigma` needs PyWavelets);
- SimpleITK `PatchBasedDenoising` (patch radius 1, 100 sample patches, 1 iteration, its default kernel
  bandwidth without re-estimation: lighter than its defaults, radius 4, 200 patches and bandwidth
  estimation, which take minutes per volume);
- SimpleITK `CurvatureAnisotropicDiffusion` (5 iterations, conductance 3, time step 0.0625 on voxel units,
  the stable step in 3D);
- SRAD (Yu & Acton, IEEE TIP 2002), slice-wise on the B-mode planes: 50 iterations of time step 0.1,
  speckle scale q0 from the median local coefficient of variation. No maintained Python package
  implements it, so it is written here, in torch, from the paper's equations.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from us3d.filters import obnlm

Method = Callable[[np.ndarray, tuple[float, float, float]], np.ndarray]


def _image(volume: np.ndarray, spacing: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing(spacing)
    return image


def obnlm_slicewise(volume, spacing):
    return obnlm(volume, "slicewise", 3, 1, 0.7, device="cpu").astype(np.float32)


def obnlm_3d(volume, spacing):
    return obnlm(volume, "3d", 3, 1, 0.7, device="cpu").astype(np.float32)


_UNET = {}


def unet(volume, spacing):
    from us3d.models.bundle import load_model
    from us3d.models.inference import predict
    from us3d.models.unet import for_inference

    if "module" not in _UNET:  # loaded once per process, like a Slicer session; run as us3d.despeckle runs it
        loaded = load_model("unet-obnlm", "cpu")
        _UNET["module"], _UNET["mapping"] = for_inference(loaded.module), loaded.input_mapping
    return predict(_UNET["module"], volume[None], torch.device("cpu"), mapping=_UNET["mapping"])[0]


def skimage_nl_means(volume, spacing):
    from skimage.restoration import denoise_nl_means

    # noise sigma from neighbouring-voxel differences (robust MAD); skimage's estimate_sigma needs PyWavelets
    difference = np.diff(volume.astype(np.float64), axis=-1).ravel()
    sigma = float(1.4826 * np.median(np.abs(difference - np.median(difference))) / np.sqrt(2))
    return denoise_nl_means(volume.astype(np.float32), patch_size=3, patch_distance=3, h=0.8 * sigma, sigma=sigma,
                            fast_mode=True, channel_axis=None).astype(np.float32)


def sitk_patch_based(volume, spacing):
    image = _image(volume, spacing)
    denoiser = sitk.PatchBasedDenoisingImageFilter()
    denoiser.SetPatchRadius(1)
    denoiser.SetNumberOfSamplePatches(100)
    denoiser.SetKernelBandwidthEstimation(False)
    denoiser.SetNumberOfIterations(1)
    return sitk.GetArrayFromImage(denoiser.Execute(image)).astype(np.float32)


def sitk_curvature_diffusion(volume, spacing):
    image = _image(volume, (1.0, 1.0, 1.0))  # voxel units, so that 0.0625 is the stable time step
    out = sitk.CurvatureAnisotropicDiffusion(image, timeStep=0.0625, conductanceParameter=3.0,
                                             numberOfIterations=5)
    return sitk.GetArrayFromImage(out).astype(np.float32)


def srad(volume, spacing, iterations: int = 50, time_step: float = 0.1):
    """Speckle-reducing anisotropic diffusion on each (j, i) plane (Yu & Acton 2002, eqs. 31-33)."""
    image = torch.from_numpy(volume.astype(np.float32))[:, None] + 1.0  # (k, 1, j, i), positive
    for _ in range(iterations):
        padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
        north, south = padded[..., :-2, 1:-1] - image, padded[..., 2:, 1:-1] - image
        west, east = padded[..., 1:-1, :-2] - image, padded[..., 1:-1, 2:] - image
        gradient2 = (north ** 2 + south ** 2 + west ** 2 + east ** 2) / image ** 2
        laplacian = (north + south + west + east) / image
        q2 = (0.5 * gradient2 - laplacian ** 2 / 16) / (1 + laplacian / 4) ** 2
        q0 = q2.flatten(1).median(dim=1).values.clamp_min(1e-6).view(-1, 1, 1, 1)  # homogeneous speckle scale
        c = (1.0 / (1.0 + (q2 - q0) / (q0 * (1 + q0)))).clamp(0.0, 1.0)
        c_padded = F.pad(c, (1, 1, 1, 1), mode="replicate")
        divergence = (c_padded[..., 2:, 1:-1] * south + c * north + c_padded[..., 1:-1, 2:] * east + c * west)
        image = image + time_step / 4 * divergence
    return (image[:, 0] - 1.0).numpy()


#: name -> (function, ours?)
METHODS: dict[str, tuple[Method, bool]] = {
    "OBNLM slice-wise (ours)": (obnlm_slicewise, True),
    "OBNLM 3d (ours)": (obnlm_3d, True),
    "U-Net unet-obnlm (ours)": (unet, True),
    "scikit-image nl_means 3D": (skimage_nl_means, False),
    "SimpleITK PatchBasedDenoising": (sitk_patch_based, False),
    "SimpleITK CurvatureAnisotropicDiffusion": (sitk_curvature_diffusion, False),
    "SRAD slice-wise": (srad, False),
}


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024
    return float("nan")


def _child(name: str, shape: tuple[int, int, int], repeats: int, volume_path: str) -> None:
    """Run in a fresh process: time `name` on a volume of `shape` and measure its peak memory."""
    function, _ = METHODS[name]
    spacing = (0.4, 0.3, 0.8)
    volume = tile_to(np.load(volume_path), shape)
    function(volume, spacing)  # warm-up at this size: compilation, model loading, TorchScript's shape profiling
    times = []
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (Linux)
        before = _rss_mib("VmRSS")
        start = time.perf_counter()
        function(volume, spacing)
        times.append(time.perf_counter() - start)
        peak = _rss_mib("VmHWM") - before
    print(json.dumps({"seconds": float(np.median(times)), "peak_mib": peak}))


def tile_to(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """`volume` repeated (mirrored at each repeat, so no seams) and cropped to `shape`."""
    reps = [-(-s // v) for s, v in zip(shape, volume.shape)]
    tiled = np.pad(volume, [(0, (r - 1) * v) for r, v in zip(reps, volume.shape)], mode="symmetric")
    return np.ascontiguousarray(tiled[: shape[0], : shape[1], : shape[2]])


def measure_in_child(name: str, shape: tuple[int, int, int], repeats: int, volume_path: str | Path,
                     threads: int, timeout: float = 900) -> dict:
    """{"seconds", "peak_mib"} of `name` on `shape`, in a fresh process with `threads` threads."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads),
               ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads))
    result = subprocess.run([sys.executable, __file__, name, *map(str, shape), str(repeats), str(volume_path)],
                            capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{name} on {shape} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _child(sys.argv[1], tuple(int(n) for n in sys.argv[2:5]), int(sys.argv[5]), sys.argv[6])
