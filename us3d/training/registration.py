"""Training of VoxelMorph on simulated breathing sequences (`us3d train-register`,
`train_registration_model`).

The paper's protocol: in each 4D sequence the exhale frame (frame 0) is the moving volume and
every other frame is fixed. Sequences come from `us3d.phantom.varied.simulate_conditions`, one
seed each, split by sequence (TRAINING, VALIDATION and TEST seeds never overlap):
- "standard": the project's simulator configuration (breathing up to 12 mm along the lateral axis);
- "varied": imaging (spacing, frequency, bandwidth, PSF widths, scatterer density, dynamic range,
  gain, attenuation with TGC, sector geometry) and breathing (5-20 mm, direction, depth dependence,
  sliding wall on or off) drawn from wide ranges, depth along i half of the time;
- "sliding" (test only): 16 mm breathing under a wall that does not follow the liver.

Frames are pre-processed (none, OBNLM or the U-Net) as at inference; one model learns every
pre-processing it is given (each pair is drawn under one of them at random, and a light Gaussian
blur of random width stands for other despeckling filters).

Loss: the endpoint error against the simulator's true motion (Charbonnier, mm; voxels whose tissue
came from outside the moving volume count a quarter, as nothing in the images shows where it
was), plus `image_weight` x MSE of the normalised fixed and warped moving volumes (the paper's
eq. 5), plus `smoothness_weight` x the squared displacement gradient (mm per mm).
`truth_weight` 0 gives the paper's purely unsupervised loss (for data without ground truth).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from us3d import __version__
from us3d.errors import InputError
from us3d.phantom import SIMULATOR_VERSION
from us3d.registration.voxelmorph import VoxelMorph, normalised, transform
from us3d.training import distributed as ddp
from us3d.training.random_motion import random_motion_pair

#: Seeds of each set, by simulation conditions; the sets never share a seed.
TRAINING = {"standard": tuple(range(2000, 2032)), "varied": tuple(range(3000, 3048))}
VALIDATION = {"standard": (9200, 9201), "varied": (9210, 9211, 9212, 9213)}
TEST = {"standard": (9100, 9101, 9102, 9103), "varied": tuple(range(9300, 9308)), "sliding": (9400, 9401, 9402, 9403)}
PREPROCESSING = ("none", "obnlm", "unet")


@dataclasses.dataclass
class MotionSequence:
    """Pre-processed frames (t, k, j, i) with the true motion of each frame from frame 0.

    Arrays may be memory-mapped from the cache; read them, never write them.
    """

    name: str
    frames: np.ndarray  # (t, k, j, i), uint8 B-mode or float16 after pre-processing
    truth: np.ndarray  # (t, k, j, i, 3) float16 mm, (x, y, z): frame t voxel x was at x + d in frame 0
    labels: np.ndarray  # (t, k, j, i) uint8 tissue labels (us3d.phantom.LABELS)
    spacing: tuple[float, float, float]  # (i, j, k) mm
    depth_axis: str = "j"  # the in-plane axis along depth ("i" for a transposed phantom)

    def frame(self, t: int) -> np.ndarray:
        return np.asarray(self.frames[t], dtype=np.float32)

    def true_field(self, t: int) -> np.ndarray:
        return np.asarray(self.truth[t], dtype=np.float32)


def _unet_key() -> str:
    from us3d.models.bundle import read_manifest
    return "unet-" + read_manifest()["unet-obnlm"]["sha256"][:12]


def preprocess_frames(frames: np.ndarray, preprocessing: str, device: str = "cpu") -> np.ndarray:
    """Frames (t, k, j, i) as registration sees them (`Registrar.preprocess`): float32, pre-processed."""
    from us3d.io import VolumeSequence
    from us3d.registration.pairs import Registrar, RegistrationSettings

    registrar = Registrar(RegistrationSettings(method="translation", preprocessing=preprocessing, device=device))
    return registrar.preprocess(VolumeSequence(frames)).frames.astype(np.float32)


def _simulated(conditions: str, seed: int, frames: int, folder: Path | None) -> dict[str, np.ndarray]:
    from us3d.phantom.varied import simulate_conditions

    if folder is not None and (folder / "truth.npy").exists():
        return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("none", "truth", "labels", "meta")}
    phantom = simulate_conditions(conditions, frames, seed)
    arrays = {"none": phantom.bmode, "truth": phantom.displacement.astype(np.float16), "labels": phantom.labels,
              "meta": np.array(list(phantom.spacing) + [0.0 if phantom.depth_axis == "j" else 1.0])}
    if folder is not None:
        _save(folder, arrays)
    return arrays


def _save(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        temporary = folder / f".{name}.{os.getpid()}.tmp.npy"  # parallel runs may write at once
        np.save(temporary, array)
        temporary.replace(folder / f"{name}.npy")


def motion_sequences(conditions: str, seeds: tuple[int, ...] | list[int], frames: int, preprocessing: str,
                     cache: Path | None = None, device: str = "cpu") -> list[MotionSequence]:
    """One simulated breathing sequence per seed under `conditions`, pre-processed; cached as .npy
    files (memory-mapped when read back) when `cache` is given. Pre-processed frames are derived
    from the cached raw ones, so each sequence is simulated once."""
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"pre-processing must be one of {', '.join(PREPROCESSING)}")
    out = []
    for seed in seeds:
        folder = None if cache is None else (cache / f"motion-{__version__}-sim{SIMULATOR_VERSION}"
                                         / f"{conditions}-{seed}-{frames}")
        arrays = _simulated(conditions, seed, frames, folder)
        if preprocessing == "none":
            frames_array = arrays["none"]
        else:
            key = preprocessing if preprocessing == "obnlm" else _unet_key()
            path = None if folder is None else folder / f"{key}.npy"
            if path is not None and path.exists():
                frames_array = np.load(path, mmap_mode="r")
            else:
                frames_array = preprocess_frames(np.asarray(arrays["none"]), preprocessing, device).astype(np.float16)
                if folder is not None:
                    _save(folder, {key: frames_array})
        meta = np.asarray(arrays["meta"])
        out.append(MotionSequence(f"{conditions} seed {seed}", frames_array, arrays["truth"], arrays["labels"],
                                  (float(meta[0]), float(meta[1]), float(meta[2])), "i" if meta[3] else "j"))
    return out


@dataclasses.dataclass
class RegistrationTrainingSettings:
    steps: int = 6000
    batch_size: int = 1
    learning_rate: float = 1e-3
    smoothness_weight: float = 0.02  # x mean squared displacement gradient (mm per mm)
    truth_weight: float = 1.0  # x Charbonnier endpoint error (mm); 0 gives the paper's unsupervised loss
    image_weight: float = 0.1  # x MSE of the normalised fixed and warped moving volumes
    random_motion: float = 0.0  # share of the pairs made by a random smooth field (`random_motion`)
    seed: int = 0


def truth_in_voxels(truth: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """(3, k, j, i) voxel displacement, channels (k, j, i), from a (k, j, i, 3) (x, y, z) mm field
    on an axis-aligned grid with `spacing` (i, j, k)."""
    return np.stack([truth[..., 2] / spacing[2], truth[..., 1] / spacing[1], truth[..., 0] / spacing[0]])


def _gaussian_blur(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """(b, 1, k, j, i) blurred by a Gaussian of `sigma` voxels along every axis (edge values)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(taps)
        pads = [0, 0, 0, 0, 0, 0]
        pads[4 - 2 * axis] = pads[5 - 2 * axis] = radius
        volume = F.conv3d(F.pad(volume, pads, mode="replicate"), taps.view(shape))
    return volume


def _pair(sequences: list[MotionSequence], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(fixed, moving, true voxel displacement (3, k, j, i), spacing (k, j, i)) of a random (frame t, frame 0)
    pair, flipped along i and k and transposed in-plane at random (depth along j or i)."""
    sequence = sequences[int(rng.integers(len(sequences)))]
    t = int(rng.integers(1, len(sequence.frames)))
    spacing = np.array([sequence.spacing[2], sequence.spacing[1], sequence.spacing[0]])
    f, m = sequence.frame(t), sequence.frame(0)
    d = truth_in_voxels(sequence.true_field(t), sequence.spacing)
    for axis in (1, 3):  # flip k, i
        if rng.random() < 0.5:
            f, m, d = np.flip(f, axis - 1), np.flip(m, axis - 1), np.flip(d, axis)
            d = d * np.where(np.arange(3) == axis - 1, -1, 1)[:, None, None, None]
    if rng.random() < 0.5:  # swap j and i
        f, m = np.swapaxes(f, 1, 2), np.swapaxes(m, 1, 2)
        d = np.swapaxes(d, 2, 3)[[0, 2, 1]]
        spacing = spacing[[0, 2, 1]]
    return (np.ascontiguousarray(f), np.ascontiguousarray(m), np.ascontiguousarray(d, dtype=np.float32),
            spacing.astype(np.float32))


def _batch(groups: list[list[MotionSequence]], settings: RegistrationTrainingSettings,
           rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """(fixed, moving, true voxel displacement, spacing (b, 3, 1, 1, 1) mm) of random pairs, each from a
    random group (pre-processing); a random intensity mapping (gamma) and, a quarter of the time, a
    Gaussian blur of random width (the same for both volumes)."""
    pairs = []
    for _ in range(settings.batch_size):
        pair = _pair(groups[int(rng.integers(len(groups)))], rng)
        if settings.random_motion > 0 and rng.random() < settings.random_motion:
            source = pair[1] if rng.random() < 0.5 else pair[0]  # frame 0 or frame t, as a texture
            pair = (*random_motion_pair(source, pair[3], rng), pair[3])
        pairs.append(pair)
    shapes = {p[0].shape for p in pairs}
    if len(shapes) > 1:  # different grids cannot share a batch: keep the first pair's shape
        pairs = [p for p in pairs if p[0].shape == pairs[0][0].shape]
    fixed, moving = [], []
    for f, m, _, _ in pairs:
        f, m = torch.from_numpy(f)[None, None], torch.from_numpy(m)[None, None]
        scale = max(float(f.max()), float(m.max()), 1e-6)
        gamma = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
        f, m = (f.clamp(min=0) / scale) ** gamma, (m.clamp(min=0) / scale) ** gamma
        if rng.random() < 0.25:
            sigma = float(rng.uniform(0.5, 1.5))
            f, m = _gaussian_blur(f, sigma), _gaussian_blur(m, sigma)
        fixed.append(f)
        moving.append(m)
    return (torch.cat(fixed), torch.cat(moving), torch.from_numpy(np.stack([p[2] for p in pairs])),
            torch.from_numpy(np.stack([p[3] for p in pairs])).view(-1, 3, 1, 1, 1))


def batch_stream(groups: list[list[MotionSequence]], settings: RegistrationTrainingSettings, rank: int = 0,
                 workers: int = 2) -> Iterator[tuple[torch.Tensor, ...]]:
    """The `settings.steps` training batches (`_batch`), made `workers` steps ahead in threads (numpy
    and torch release the GIL on whole volumes) so a GPU need not wait for them. Batch n is drawn from
    its own generator, seeded by (seed, rank, n): the same batches whatever the number of workers."""
    def make(step: int) -> tuple[torch.Tensor, ...]:
        return _batch(groups, settings, np.random.default_rng([settings.seed, rank, step]))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead = collections.deque(pool.submit(make, step) for step in range(1, min(settings.steps, 2 * workers) + 1))
        for step in range(1, settings.steps + 1):
            batch = ahead.popleft().result()
            if step + len(ahead) < settings.steps:
                ahead.append(pool.submit(make, step + len(ahead) + 1))
            yield batch


def source_inside_voxels(displacement: torch.Tensor) -> torch.Tensor:
    """(b, 1, k, j, i) bool: the voxels x whose x + u(x) falls inside the volume (u in voxels)."""
    shape = displacement.shape[2:]
    inside = torch.ones_like(displacement[:, :1], dtype=torch.bool)
    for axis in range(3):
        position = torch.arange(shape[axis], dtype=displacement.dtype, device=displacement.device).view(
            [-1 if a == axis else 1 for a in range(3)]) + displacement[:, axis:axis + 1]
        inside &= (position >= -0.5) & (position <= shape[axis] - 0.5)
    return inside


def smoothness_mm(displacement: torch.Tensor, spacing: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of the displacement (mm) per mm, along k, j and i."""
    mm = displacement * spacing
    total = torch.zeros((), dtype=mm.dtype, device=mm.device)
    for axis in range(3):
        step = spacing[:, axis].view(-1, 1, 1, 1, 1)
        total = total + (torch.diff(mm, dim=2 + axis) / step).pow(2).mean()
    return total / 3


class EveryLevel(torch.nn.Module):
    """The network's `levels` as a forward (what DDP wraps)."""

    def __init__(self, model: VoxelMorph) -> None:
        super().__init__()
        self.model = model

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> list[torch.Tensor]:
        return self.model.levels(fixed, moving)


#: Weights of the endpoint error of each level's estimate, coarsest first (the finest is the output).
LEVEL_WEIGHTS = (0.25, 0.5, 1.0)


def training_loss(model: torch.nn.Module, fixed: torch.Tensor, moving: torch.Tensor, truth: torch.Tensor,
                  spacing: torch.Tensor, settings: RegistrationTrainingSettings) -> dict[str, torch.Tensor]:
    """{"loss", "endpoint", "mse", "smoothness"}: the weighted sum and its terms (see the module);
    `model` gives every level's estimate (`EveryLevel`), each level's endpoint error counts with
    LEVEL_WEIGHTS, the reported "endpoint" is the output's."""
    estimates = model(fixed, moving)
    weight = torch.where(source_inside_voxels(truth), 1.0, 0.25)
    endpoints = []
    for estimate in estimates:
        error = ((estimate - truth) * spacing).pow(2).sum(1, keepdim=True)
        endpoints.append((weight * torch.sqrt(error + 0.01)).sum() / weight.sum())
    endpoint = endpoints[-1]
    displacement = estimates[-1]
    supervised = sum(w * e for w, e in zip(LEVEL_WEIGHTS[-len(endpoints):], endpoints))
    mse = F.mse_loss(transform(normalised(moving), displacement), normalised(fixed))
    smooth = smoothness_mm(displacement, spacing)
    loss = settings.truth_weight * supervised + settings.image_weight * mse + settings.smoothness_weight * smooth
    return {"loss": loss, "endpoint": endpoint, "mse": mse, "smoothness": smooth}


def train_registration(groups: list[list[MotionSequence]], settings: RegistrationTrainingSettings,
                       device: torch.device, log: Callable[[dict], None] | None = None,
                       initial: dict[str, torch.Tensor] | None = None) -> VoxelMorph:
    """Train VoxelMorph on (frame t, frame 0) pairs of the sequences in `groups` (one group per
    pre-processing), from random weights or from `initial` (a VoxelMorph state dict, for fine-tuning);
    returns the model (rank 0's copy under DDP)."""
    if any(len(s.frames) < 2 for sequences in groups for s in sequences):
        raise ValueError("every training sequence needs at least 2 frames")
    distributed, rank, device = ddp.start(device)
    torch.manual_seed(settings.seed)
    model = VoxelMorph()
    if initial is not None:
        model.load_state_dict(initial)
    model = model.to(device)
    trained = EveryLevel(model)
    if distributed:
        trained = torch.nn.parallel.DistributedDataParallel(trained)
    optimiser = torch.optim.Adam(trained.parameters(), lr=settings.learning_rate)
    schedule = ddp.cosine_schedule(optimiser, settings.steps)
    start, running = time.perf_counter(), []
    names = ("loss", "endpoint", "mse", "smoothness")
    workers = max(1, min(4, (os.cpu_count() or 2) // 2))
    for step, batch in enumerate(batch_stream(groups, settings, rank, workers), start=1):
        fixed, moving, truth, spacing = (x.to(device, non_blocking=True) for x in batch)
        terms = training_loss(trained, fixed, moving, truth, spacing, settings)
        optimiser.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 10.0)
        optimiser.step()
        schedule.step()
        running.append([float(terms[name].detach()) for name in names])
        if log is not None and rank == 0 and (step % 50 == 0 or step == settings.steps):
            mean = np.mean(running, axis=0)
            log({"step": step, **{name: float(value) for name, value in zip(names, mean)},
                 "lr": schedule.get_last_lr()[0], "seconds": round(time.perf_counter() - start, 1)})
            running = []
    ddp.stop(distributed)
    return model.eval()


def _rigid(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    from us3d.registration.voxelmorph import translation
    shift = translation(normalised(fixed), normalised(moving))
    return shift.view(-1, 3, 1, 1, 1).expand(-1, 3, *fixed.shape[2:])


def validate(module: torch.nn.Module, groups: dict[str, list[MotionSequence]]) -> list[dict]:
    """Per pre-processing and held-out sequence: mean endpoint error (mm) of the model and of its rigid
    step alone over the voxels whose source lies inside the moving volume, and normalised MSE."""
    rows = []
    with torch.inference_mode():
        for preprocessing, sequence in ((p, s) for p, sequences in groups.items() for s in sequences):
            spacing = torch.tensor([sequence.spacing[2], sequence.spacing[1], sequence.spacing[0]]).view(1, 3, 1, 1, 1)
            moving = torch.from_numpy(sequence.frame(0))[None, None]
            errors, rigid, before, after = [], [], [], []
            for t in range(1, len(sequence.frames)):
                fixed = torch.from_numpy(sequence.frame(t))[None, None]
                truth = torch.from_numpy(truth_in_voxels(sequence.true_field(t), sequence.spacing))[None]
                inside = source_inside_voxels(truth)[:, 0]
                displacement = module(fixed, moving)
                for out, estimate in ((errors, displacement), (rigid, _rigid(fixed, moving))):
                    out.append(float(((estimate - truth) * spacing).pow(2).sum(1).sqrt()[inside].mean()))
                before.append(float(F.mse_loss(normalised(moving), normalised(fixed))))
                after.append(float(F.mse_loss(transform(normalised(moving), displacement), normalised(fixed))))
            rows.append({"preprocessing": preprocessing, "sequence": sequence.name, "pairs": len(errors),
                         "endpoint_error_mm": float(np.mean(errors)), "rigid_endpoint_error_mm": float(np.mean(rigid)),
                         "mse_before": float(np.mean(before)), "mse_after": float(np.mean(after))})
    return rows


def _prepare_one(job: tuple) -> None:
    conditions, seed, frames, preprocessing, cache = job
    torch.set_num_threads(1)
    for pre in preprocessing:
        motion_sequences(conditions, [seed], frames, pre, cache)


def prepare_cache(sets: list[dict[str, tuple[int, ...]]], frames: int, preprocessing: list[str], cache: Path,
                  workers: int | None = None) -> None:
    """Simulate and pre-process every sequence of `sets` into `cache`, one process per core (what is
    cached already is skipped)."""
    import multiprocessing

    jobs = [(conditions, seed, frames, tuple(preprocessing), cache)
            for conditions_seeds in sets for conditions, seeds in conditions_seeds.items() for seed in seeds]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        for job in jobs:
            _prepare_one(job)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_prepare_one, jobs, chunksize=1)


def training_groups(preprocessing: list[str], frames: int, cache: Path | None,
                    conditions: dict[str, tuple[int, ...]] = TRAINING) -> list[list[MotionSequence]]:
    """One list of training sequences per pre-processing (every condition's seeds)."""
    return [[s for name, seeds in conditions.items() for s in motion_sequences(name, seeds, frames, pre, cache)]
            for pre in preprocessing]


def training_metadata(preprocessing: list[str], settings: RegistrationTrainingSettings, data: dict,
                      wall_seconds: float, device: str) -> dict:
    model = VoxelMorph()
    return {
        "us3d_version": __version__,
        "task": "registration",
        "architecture": {"name": "VoxelMorph with a correlation decoder", "encoder": model.encoder_widths,
                         "correlation_radii": model.radii, "still_radii": model.still_radii,
                         "estimators": model.estimator_widths, "flow_resolution": "half in-plane",
                         "pre_alignment": "FFT cross-correlation translation"},
        "output": "displacement in voxels, (b, 3, k, j, i), channels (k, j, i): moving(x + u) matches fixed(x)",
        "normalisation": "each volume: (x - mean) / std, inside the model",
        "preprocessing": preprocessing,
        "training": dict(dataclasses.asdict(settings), data=data, wall_seconds=round(wall_seconds), device=device,
                         processes=ddp.world_size(), torch=torch.__version__),
    }


def sliding_walls(seeds: dict[str, Iterable[int]]) -> dict[str, int]:
    """Per conditions, how many of its sequences (seeds) have an abdominal wall that slides over the
    liver (`us3d.phantom.varied.draw_conditions`) rather than moving with it."""
    from us3d.phantom.varied import draw_conditions

    return {conditions: sum(draw_conditions(conditions, seed)[1].sliding for seed in group)
            for conditions, group in seeds.items()}


def model_card(name: str, metadata: dict, validation: list[dict]) -> str:
    """Markdown model card: architecture, data, loss, run and held-out validation figures."""
    training, data = metadata["training"], metadata["training"]["data"]
    # the metadata records each condition's seeds as "first-last"
    spans = {conditions: range(int(span.split("-")[0]), int(span.split("-")[1]) + 1)
             for conditions, span in data["seeds"].items()}
    sliding, sequences = sum(sliding_walls(spans).values()), sum(len(group) for group in spans.values())
    names = {"none": "none (B-mode as acquired)", "obnlm": "OBNLM (slice-wise, M=3, alpha=1, h=0.7)",
             "unet": "the bundled unet-obnlm U-Net"}
    pre = "; ".join(names[p] for p in metadata["preprocessing"])
    sets = ", ".join(f"{conditions} seeds {seeds}" for conditions, seeds in data["seeds"].items())
    lines = [
        f"# Model card: {name}",
        "",
        f"VoxelMorph for respiratory motion in 3D ultrasound (us3d {metadata['us3d_version']}), TorchScript, "
        "any volume size (padded to multiples of 4 x 8 x 8 inside).",
        "",
        f"- **Input pre-processings learnt** (each training pair drawn under one at random, a quarter of them "
        f"blurred by a Gaussian of 0.5-1.5 voxels): {pre}; the same pre-processing is applied to fixed and "
        "moving volumes before the model.",
        f"- **Output**: {metadata['output']}; `us3d register` turns it into an ITK displacement field (LPS, mm), "
        "and by default corrects it with each depth band's own translation where that matches better "
        "(`us3d.registration.layers`), then refines it per pair (`us3d.registration.refine`).",
        f"- **Architecture** (`us3d.registration.voxelmorph.VoxelMorph`): the FFT translation of the volumes is "
        "the first estimate; a shared encoder (widths "
        f"{metadata['architecture']['encoder']}, three levels down to 1/8 in-plane and 1/4 in elevation) gives "
        "features of both volumes; coarse to fine, cost volumes (cosine similarity of the feature vectors) "
        "against the moving features warped by the "
        f"current estimate (radii {metadata['architecture']['correlation_radii']} voxels) and not moved at all "
        f"(radii {metadata['architecture']['still_radii']}) feed estimators (widths "
        f"{metadata['architecture']['estimators']}) of the share of the translation each voxel makes and of a "
        f"residual; output at half in-plane resolution, upsampled; {metadata['parameters']:,} parameters.",
        f"- **Training data**: {data['sequences']} simulated breathing sequences x {data['frames']} frames ({sets}; "
        "`us3d.phantom.varied`: standard and varied imaging and breathing"
        f"{'; simulator version ' + str(data['simulator']) if 'simulator' in data else ''}); pairs (frame t, exhale "
        "frame 0), flipped along i and k and transposed in-plane at random, random intensity gamma"
        + (f"; {100 * training.get('random_motion', 0.0):.0f}% of the pairs are instead one training frame warped by a "
           "random smooth field (bulk shift 0-5 mm SD per axis, a deformation on control points 12-30 mm apart of "
           "0.3-3 mm SD), its texture zoomed 1-2x and half of the time seen through a random data hull "
           "(`us3d.training.random_motion`), meant to teach the network motions and textures the simulator "
           "does not make." if training.get("random_motion", 0.0) > 0 else "."),
        f"- **Abdominal wall**: in {sliding} of these {sequences} sequences the wall slides over the liver, in the "
        "others it moves with it; the error in the wall, sequence by sequence, for walls of both kinds: "
        "`python benchmarks/diagnose_registration.py`.",
        f"- **Loss**: {training['truth_weight']} x endpoint error against the simulator's true motion "
        f"(Charbonnier, mm) + {training['image_weight']} x MSE of normalised intensities (the paper's eq. 5) + "
        f"{training['smoothness_weight']} x squared displacement gradient (mm/mm).",
        f"- **Training**: {training['steps']} steps of batch {training['batch_size']}, Adam lr "
        f"{training['learning_rate']} with cosine decay, seed {training['seed']}; "
        f"{training['wall_seconds'] / 60:.0f} min on {training['device']} ({training['processes']} process(es)), "
        f"torch {training['torch']}."
        + (f" Fine-tuned from `{training['initial']['model']}` (weights sha256 "
           f"`{training['initial']['weights_sha256'][:12]}...`; {training['initial']['steps']} steps, random-motion "
           f"share {training['initial']['random_motion']:g})."
           if "initial" in training else ""),
        f"- **Weights sha256**: `{metadata['weights_sha256']}`",
        "",
        "## Held-out validation sequences (never trained on), network alone (no refinement)",
        "",
        "| input | sequence | pairs | mean endpoint error (mm) | its rigid step alone (mm) | MSE before | MSE after |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in validation:
        lines.append(f"| {row['preprocessing']} | {row['sequence']} | {row['pairs']} | {row['endpoint_error_mm']:.3f} "
                     f"| {row['rigid_endpoint_error_mm']:.3f} | {row['mse_before']:.4f} | {row['mse_after']:.4f} |")
    if validation:
        network = float(np.mean([row["endpoint_error_mm"] for row in validation]))
        rigid = float(np.mean([row["rigid_endpoint_error_mm"] for row in validation]))
        worst = max(validation, key=lambda row: row["endpoint_error_mm"] - row["rigid_endpoint_error_mm"])
        lines += ["", f"Mean over these rows: **{network:.3f} mm** against {rigid:.3f} mm for the rigid step alone "
                  f"({100 * (1 - network / rigid):.0f}% lower; the goal of issue 11 is 40%). Least gain: "
                  f"{worst['preprocessing']} {worst['sequence']}, {worst['endpoint_error_mm']:.3f} mm against "
                  f"{worst['rigid_endpoint_error_mm']:.3f} mm."]
    lines += ["", "Endpoint error over the voxels whose true source lies inside the moving volume; MSE on volumes "
              "normalised to zero mean and unit std. Benchmark on the test sequences: "
              "`python benchmarks/bench_registration.py`.", ""]
    return "\n".join(lines)


def train_registration_model(output: str | os.PathLike, settings: RegistrationTrainingSettings,
                             preprocessing: tuple[str, ...] = PREPROCESSING, frames: int = 8,
                             device: str = "auto", cache: str | os.PathLike | None = None,
                             conditions: dict[str, tuple[int, ...]] = TRAINING,
                             initial_model: str | None = None) -> list[dict]:
    """Train VoxelMorph and write the TorchScript model `output` (.pt) with its model card (.md) and
    training log (.log.jsonl); a model written into Resources/Models/ is entered in the manifest.
    `initial_model`: a registration model file or bundled name whose weights training starts from
    (fine-tuning), else random weights. Returns the held-out validation rows. Under torchrun only
    rank 0 writes."""
    from us3d.devices import resolve_device
    from us3d.training.despeckle import write_log_line

    output = Path(output)
    used = resolve_device(device)
    cache = Path(cache) if cache is not None else None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    inputs = list(dict.fromkeys(preprocessing))
    initial, origin = None, None
    if initial_model is not None:  # checked before the cache, which may take half an hour to fill
        from us3d.models.bundle import load_model

        loaded = load_model(initial_model)
        if loaded.metadata.get("task") != "registration":
            raise InputError(f"{loaded.name} is not a registration model")
        initial = loaded.module.state_dict()
        origin = {"model": loaded.path.name, "weights_sha256": loaded.metadata["weights_sha256"],
                  "steps": loaded.metadata.get("training", {}).get("steps"),
                  "random_motion": loaded.metadata.get("training", {}).get("random_motion", 0.0),
                  "learning_rate": loaded.metadata.get("training", {}).get("learning_rate")}
    if cache is not None and rank0:
        prepare_cache([conditions, VALIDATION], frames, inputs, cache)
    groups = training_groups(inputs, frames, cache, conditions)
    log_path = output.with_suffix(".log.jsonl")
    if rank0 and log_path.exists():
        log_path.unlink()
    start = time.perf_counter()
    model = train_registration(groups, settings, used, write_log_line(log_path) if rank0 else None, initial)
    if not rank0:
        return []
    return write_registration_model(model, output, settings, inputs, frames, cache, conditions,
                                    time.perf_counter() - start, used.type, origin)


def write_registration_model(model: VoxelMorph, output: str | os.PathLike, settings: RegistrationTrainingSettings,
                             inputs: list[str], frames: int, cache: Path | None,
                             conditions: dict[str, tuple[int, ...]], wall_seconds: float, device: str,
                             initial: dict | None = None) -> list[dict]:
    """Validate a trained `model` on the held-out VALIDATION sequences and write it as `output` (.pt,
    TorchScript with its metadata) with its model card (.md); a model written into Resources/Models/
    is entered in the manifest. `device`: where it was trained, for the card; `initial`: the model it
    was fine-tuned from (file name, weights sha256, its training steps). Returns the validation rows."""
    from us3d.models.bundle import MODELS_DIR, save_model, update_manifest, weights_sha256

    output = Path(output)
    data = {"sequences": sum(len(seeds) for seeds in conditions.values()), "frames": frames,
            "seeds": {name: f"{seeds[0]}-{seeds[-1]}" for name, seeds in conditions.items()},
            "simulator": SIMULATOR_VERSION}
    metadata = training_metadata(inputs, settings, data, wall_seconds, device)
    if initial is not None:
        metadata["training"]["initial"] = initial
    model = model.cpu().eval()
    metadata["parameters"] = sum(p.numel() for p in model.parameters())
    held_out = {pre: [s for name, seeds in VALIDATION.items() for s in motion_sequences(name, seeds, frames, pre, cache)]
                for pre in inputs}
    validation = validate(model, held_out)
    metadata["validation"] = validation
    digest = save_model(model, output, metadata)
    output.with_suffix(".md").write_text(model_card(output.stem, dict(metadata, weights_sha256=weights_sha256(model)),
                                                    validation))
    if output.resolve().parent == MODELS_DIR.resolve():
        update_manifest(output.stem, output.name, digest, "+".join(inputs), task="registration")
    return validation
