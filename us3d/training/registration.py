"""Training of VoxelMorph on simulated breathing sequences (`us3d train-register`).

The paper's protocol: in each 4D sequence the exhale frame (frame 0) is the moving volume and
every other frame is fixed. Sequences come from `us3d.phantom` (randomised anatomy and
breathing up to 12 mm), one seed each, split by sequence: training seeds from
TRAINING_SEED_START, validation seeds VALIDATION_SEEDS, benchmark (test) seeds TEST_SEEDS.
Frames are pre-processed (none, OBNLM or the U-Net) before training, as at inference; one model
learns all the pre-processings it is given (each pair is drawn under one of them at random), so
the bundled model serves original, OBNLM and U-Net inputs alike.

Loss: MSE between the normalised fixed and warped moving volumes (the paper's eq. 5) plus
`smoothness_weight` x the squared displacement gradients (voxels), plus `truth_weight` x the
squared endpoint error (mm^2) against the simulator's true motion. `truth_weight` 0 is the
paper's purely unsupervised loss (what real data without ground truth allows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from us3d import __version__
from us3d.phantom import simulate_sequence
from us3d.registration.voxelmorph import VoxelMorph, normalised, smoothness, transform
from us3d.training import distributed as ddp

TRAINING_SEED_START = 2000
VALIDATION_SEEDS = (9200, 9201)
TEST_SEEDS = (9100, 9101, 9102, 9103)


@dataclasses.dataclass
class MotionSequence:
    """Pre-processed frames (t, k, j, i) and the true motion of each frame from frame 0."""

    name: str
    frames: np.ndarray  # float32
    truth: np.ndarray  # (t, k, j, i, 3) float32 mm, (x, y, z): frame t voxel x was at x + d in frame 0
    spacing: tuple[float, float, float]  # (i, j, k) mm


def _preprocessing_key(preprocessing: str) -> str:
    if preprocessing != "unet":
        return preprocessing
    from us3d.models.bundle import read_manifest
    return "unet:" + read_manifest()["unet-obnlm"]["sha256"]


def preprocess_frames(frames: np.ndarray, preprocessing: str, device: str = "cpu") -> np.ndarray:
    """Frames (t, k, j, i) as registration sees them: float32, despeckled unless "none"."""
    from us3d.despeckle import despeckle
    from us3d.io import VolumeSequence
    from us3d.registration.pairs import preprocess_settings

    settings = preprocess_settings(preprocessing)
    if settings is None:
        return frames.astype(np.float32)
    return despeckle(VolumeSequence(frames), settings, device).output.frames.astype(np.float32)


def motion_sequences(seeds: list[int] | tuple[int, ...], frames: int, preprocessing: str,
                     cache: Path | None = None, device: str = "cpu") -> list[MotionSequence]:
    """One simulated breathing sequence per seed, pre-processed; cached as .npz when `cache` is given
    (pre-processed sequences are derived from the cached raw ones, so each is simulated once)."""
    out = []
    for seed in seeds:
        key = json.dumps({"seed": seed, "frames": frames, "pre": _preprocessing_key(preprocessing),
                          "us3d": __version__}, sort_keys=True)
        path = None
        if cache is not None:
            path = cache / f"motion-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
            if path.exists():
                with np.load(path) as stored:
                    out.append(MotionSequence(str(stored["name"]), stored["frames"], stored["truth"],
                                              tuple(float(s) for s in stored["spacing"])))
                continue
        if preprocessing == "none":
            phantom = simulate_sequence(frames, seed)
            sequence = MotionSequence(f"phantom seed {seed}", phantom.bmode.astype(np.float32), phantom.displacement,
                                      phantom.spacing)
        else:
            raw = motion_sequences([seed], frames, "none", cache, device)[0]
            sequence = dataclasses.replace(raw, frames=preprocess_frames(raw.frames, preprocessing, device))
        if path is not None:
            cache.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # parallel runs may write at once
            np.savez(temporary, name=sequence.name, frames=sequence.frames, truth=sequence.truth,
                     spacing=np.array(sequence.spacing))
            temporary.replace(path)
        out.append(sequence)
    return out


@dataclasses.dataclass
class RegistrationTrainingSettings:
    steps: int = 2000
    batch_size: int = 1
    learning_rate: float = 1e-3
    smoothness_weight: float = 0.1
    truth_weight: float = 0.5  # per mm^2; 0 gives the paper's unsupervised loss
    seed: int = 0


def truth_in_voxels(truth: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """(3, k, j, i) voxel displacement, channels (k, j, i), from a (k, j, i, 3) (x, y, z) mm field
    on an axis-aligned grid with `spacing` (i, j, k)."""
    return np.stack([truth[..., 2] / spacing[2], truth[..., 1] / spacing[1], truth[..., 0] / spacing[0]])


def _batch(groups: list[list[MotionSequence]], settings: RegistrationTrainingSettings,
           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fixed, moving, true voxel displacement, spacing (k, j, i) mm) for random (frame t, frame 0) pairs
    of a random group (pre-processing), mirrored in i half of the time."""
    fixed, moving, truth = [], [], []
    for _ in range(settings.batch_size):
        sequences = groups[int(rng.integers(len(groups)))]
        sequence = sequences[int(rng.integers(len(sequences)))]
        t = int(rng.integers(1, len(sequence.frames)))
        f, m, d = sequence.frames[t], sequence.frames[0], truth_in_voxels(sequence.truth[t], sequence.spacing)
        if rng.random() < 0.5:
            f, m, d = f[..., ::-1], m[..., ::-1], d[..., ::-1] * np.array([1, 1, -1])[:, None, None, None]
        fixed.append(np.ascontiguousarray(f))
        moving.append(np.ascontiguousarray(m))
        truth.append(np.ascontiguousarray(d, dtype=np.float32))
    spacing = groups[0][0].spacing
    return (torch.from_numpy(np.stack(fixed))[:, None], torch.from_numpy(np.stack(moving))[:, None],
            torch.from_numpy(np.stack(truth)), torch.tensor([spacing[2], spacing[1], spacing[0]]).view(1, 3, 1, 1, 1))


def training_loss(model: torch.nn.Module, fixed: torch.Tensor, moving: torch.Tensor, truth: torch.Tensor,
                  spacing: torch.Tensor, settings: RegistrationTrainingSettings) -> dict[str, torch.Tensor]:
    """{"loss", "mse", "smoothness", "endpoint"}: the weighted sum and its terms."""
    displacement = model(fixed, moving)
    warped = transform(normalised(moving), displacement)
    mse = torch.nn.functional.mse_loss(warped, normalised(fixed))
    smooth = smoothness(displacement)
    endpoint = ((displacement - truth) * spacing).pow(2).sum(1).mean()
    loss = mse + settings.smoothness_weight * smooth + settings.truth_weight * endpoint
    return {"loss": loss, "mse": mse, "smoothness": smooth, "endpoint": endpoint}


def train_registration(groups: list[list[MotionSequence]], settings: RegistrationTrainingSettings,
                       device: torch.device, log: Callable[[dict], None] | None = None) -> VoxelMorph:
    """Train VoxelMorph on (frame t, frame 0) pairs of the sequences in `groups` (one group per
    pre-processing); returns the model (rank 0's copy under DDP)."""
    if any(len(s.frames) < 2 for sequences in groups for s in sequences):
        raise ValueError("every training sequence needs at least 2 frames")
    distributed, rank, device = ddp.start(device)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, rank])
    model = VoxelMorph().to(device)
    trained = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimiser = torch.optim.Adam(trained.parameters(), lr=settings.learning_rate)
    schedule = ddp.cosine_schedule(optimiser, settings.steps)
    start, running = time.perf_counter(), []
    for step in range(1, settings.steps + 1):
        fixed, moving, truth, spacing = (x.to(device) for x in _batch(groups, settings, rng))
        terms = training_loss(trained, fixed, moving, truth, spacing, settings)
        optimiser.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimiser.step()
        schedule.step()
        running.append([float(terms[name].detach()) for name in ("loss", "mse", "smoothness", "endpoint")])
        if log is not None and rank == 0 and (step % 50 == 0 or step == settings.steps):
            mean = np.mean(running, axis=0)
            log({"step": step, "loss": float(mean[0]), "mse": float(mean[1]), "smoothness": float(mean[2]),
                 "endpoint_mm2": float(mean[3]), "lr": schedule.get_last_lr()[0],
                 "seconds": round(time.perf_counter() - start, 1)})
            running = []
    ddp.stop(distributed)
    return model.eval()


def validate(module: torch.nn.Module, groups: dict[str, list[MotionSequence]]) -> list[dict]:
    """Per pre-processing and held-out sequence: mean endpoint error (mm) and normalised MSE before/after,
    over its pairs."""
    rows = []
    with torch.inference_mode():
        for preprocessing, sequence in ((p, s) for p, sequences in groups.items() for s in sequences):
            spacing = torch.tensor([sequence.spacing[2], sequence.spacing[1], sequence.spacing[0]]).view(1, 3, 1, 1, 1)
            moving = torch.from_numpy(sequence.frames[0])[None, None]
            errors, before, after = [], [], []
            for t in range(1, len(sequence.frames)):
                fixed = torch.from_numpy(sequence.frames[t])[None, None]
                displacement = module(fixed, moving)
                truth = torch.from_numpy(truth_in_voxels(sequence.truth[t], sequence.spacing))[None]
                errors.append(float(((displacement - truth) * spacing).pow(2).sum(1).sqrt().mean()))
                before.append(float(torch.nn.functional.mse_loss(normalised(moving), normalised(fixed))))
                after.append(float(torch.nn.functional.mse_loss(transform(normalised(moving), displacement),
                                                                normalised(fixed))))
            rows.append({"preprocessing": preprocessing, "sequence": sequence.name, "pairs": len(errors),
                         "endpoint_error_mm": float(np.mean(errors)),
                         "mse_before": float(np.mean(before)), "mse_after": float(np.mean(after))})
    return rows


def training_metadata(preprocessing: list[str], settings: RegistrationTrainingSettings, data: dict, wall_seconds: float,
                      device: str, spacing: tuple[float, float, float]) -> dict:
    model = VoxelMorph()
    return {
        "us3d_version": __version__,
        "task": "registration",
        "architecture": {"name": "VoxelMorph", "encoder": model.encoder_widths, "decoder": model.decoder_widths,
                         "integration_steps": model.integration_steps, "flow_resolution": "half in-plane",
                         "pre_alignment": "FFT cross-correlation translation"},
        "output": "displacement in voxels, (b, 3, k, j, i), channels (k, j, i): moving(x + u) matches fixed(x)",
        "normalisation": "each volume: (x - mean) / std, inside the model",
        "preprocessing": preprocessing,
        "training_spacing_mm": list(spacing),
        "training": dict(dataclasses.asdict(settings), data=data, wall_seconds=round(wall_seconds), device=device,
                         processes=ddp.world_size(), torch=torch.__version__),
    }


def model_card(name: str, metadata: dict, validation: list[dict]) -> str:
    """Markdown model card: architecture, data, loss, run and held-out validation figures."""
    training, data = metadata["training"], metadata["training"]["data"]
    names = {"none": "none (B-mode as acquired)", "obnlm": "OBNLM (slice-wise, M=3, alpha=1, h=0.7)",
             "unet": "the bundled unet-obnlm U-Net"}
    pre = "; ".join(names[p] for p in metadata["preprocessing"])
    lines = [
        f"# Model card: {name}",
        "",
        f"VoxelMorph for respiratory motion in 3D ultrasound (us3d {metadata['us3d_version']}), TorchScript, "
        "any volume size (padded to multiples of 8 x 16 x 16 inside).",
        "",
        f"- **Input pre-processings learnt** (each training pair drawn under one at random): {pre}; the same "
        "pre-processing is applied to fixed and moving volumes before the model.",
        f"- **Output**: {metadata['output']}; `us3d register` turns it into an ITK displacement field (LPS, mm).",
        f"- **Architecture**: encoder {metadata['architecture']['encoder']}, decoder "
        f"{metadata['architecture']['decoder']}, after a rigid pre-alignment (translation from the FFT "
        "cross-correlation of the volumes; the network predicts the rest), velocity at half in-plane resolution, "
        f"{metadata['architecture']['integration_steps']} scaling-and-squaring steps; "
        f"{metadata['parameters']:,} parameters.",
        f"- **Training data**: {data['sequences']} simulated breathing sequences x {data['frames']} frames "
        f"(seeds {data['seeds']}), grid spacing {metadata['training_spacing_mm']} mm (i, j, k); pairs (frame t, "
        "exhale frame 0), mirrored laterally at random.",
        f"- **Loss**: MSE of normalised intensities (the paper's eq. 5) + {training['smoothness_weight']} x "
        f"smoothness + {training['truth_weight']} x squared endpoint error (mm^2) against the simulator's true motion.",
        f"- **Training**: {training['steps']} steps of batch {training['batch_size']}, Adam lr "
        f"{training['learning_rate']} with cosine decay, seed {training['seed']}; "
        f"{training['wall_seconds'] / 60:.0f} min on {training['device']} ({training['processes']} process(es)), "
        f"torch {training['torch']}.",
        f"- **Weights sha256**: `{metadata['weights_sha256']}`",
        "",
        "## Held-out validation sequences (never trained on)",
        "",
        "| input | sequence | pairs | mean endpoint error, every voxel (mm) | MSE before | MSE after |",
        "|---|---|---|---|---|---|",
    ]
    for row in validation:
        lines.append(f"| {row['preprocessing']} | {row['sequence']} | {row['pairs']} | {row['endpoint_error_mm']:.3f} "
                     f"| {row['mse_before']:.4f} | {row['mse_after']:.4f} |")
    lines += ["", "MSE on volumes normalised to zero mean and unit std. Benchmark on the test sequences: "
              "`python benchmarks/bench_registration.py`.", ""]
    return "\n".join(lines)
