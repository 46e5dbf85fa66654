"""Training of the 3D dense U-Net despeckler (`us3d train-despeckle`).

Random crops (default 32x64x64 voxels, (k, j, i)) of the training volumes, flipped in-plane
and scaled by a random gain, normalised by their whole volume's mean and std; MSE loss
against the normalised target, Adam with cosine learning-rate decay. Seeded and, on the
CPU, deterministic. Under `torchrun` (WORLD_SIZE > 1) it trains data-parallel with DDP
(gloo on CPU, NCCL on CUDA): each process draws its own crops, gradients are averaged.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from us3d import __version__, metrics
from us3d.despeckle import ObnlmSettings
from us3d.models.inference import normalisation, predict
from us3d.models.unet import DenseUNet3D
from us3d.training.data import TrainingVolume
from us3d.training import distributed as ddp


@dataclasses.dataclass
class TrainingSettings:
    steps: int = 3000
    batch_size: int = 4
    crop: tuple[int, int, int] = (32, 64, 64)  # (k, j, i) voxels; j, i multiples of 16
    learning_rate: float = 2e-3
    seed: int = 0
    gain_range: tuple[float, float] = (0.7, 1.3)


def _pick_crop(volume: TrainingVolume, crop: tuple[int, int, int], rng: np.random.Generator) -> tuple[slice, ...]:
    shape = volume.input.shape
    size = [min(c, s) for c, s in zip(crop, shape)]
    size[1] -= size[1] % 16
    size[2] -= size[2] % 16
    for _ in range(20):
        corner = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, size)]
        region = tuple(slice(c, c + n) for c, n in zip(corner, size))
        if volume.valid is None or volume.valid[region].mean() > 0.6:
            break
    return region


def _batch(volumes: list[TrainingVolume], stats: list[tuple[float, float]], settings: TrainingSettings,
           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = [], []
    for _ in range(settings.batch_size):
        n = int(rng.integers(len(volumes)))
        region = _pick_crop(volumes[n], settings.crop, rng)
        mean, std = stats[n]
        x = (volumes[n].input[region] - mean) / std
        y = (volumes[n].target[region] - mean) / std
        # Gain: the model sees every volume normalised, so a gain changes nothing but the
        # rounding of the input; it keeps the model honest about intensity scale.
        gain = rng.uniform(*settings.gain_range)
        x, y = x * gain, y * gain
        for axis in (1, 2):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        inputs.append(np.ascontiguousarray(x))
        targets.append(np.ascontiguousarray(y))
    if len({a.shape for a in inputs}) > 1:  # small volumes give smaller crops: one per batch then
        inputs, targets = inputs[:1], targets[:1]
    return (torch.from_numpy(np.stack(inputs)[:, None]).float(), torch.from_numpy(np.stack(targets)[:, None]).float())


def validate(module: torch.nn.Module, volumes: list[TrainingVolume], device: torch.device) -> list[dict]:
    """PSNR against the target (grey levels, peak 255: the volumes are 8-bit B-mode) and SMPI of
    output and target, per held-out volume; inside `valid` where a volume has such a mask."""
    rows = []
    for volume in volumes:
        output = predict(module.eval(), volume.input[None], device)[0].astype(np.float64)
        target, original = volume.target.astype(np.float64), volume.input.astype(np.float64)
        mask = volume.valid if volume.valid is not None else np.ones(target.shape, bool)
        rows.append({
            "volume": volume.name,
            "psnr": metrics.psnr(output[mask], target[mask], data_range=255),
            "psnr_identity": metrics.psnr(original[mask], target[mask], data_range=255),
            "smpi_model": metrics.smpi(original, output, mask),
            "smpi_target": metrics.smpi(original, target, mask),
        })
    return rows


def train_despeckler(volumes: list[TrainingVolume], settings: TrainingSettings, device: torch.device,
                     log: Callable[[dict], None] | None = None) -> DenseUNet3D:
    """Train a DenseUNet3D on (input, target) volumes; returns the model (rank 0's copy under DDP)."""
    distributed, rank, device = ddp.start(device)
    torch.manual_seed(settings.seed)  # same initial weights on every rank
    rng = np.random.default_rng([settings.seed, rank])
    model = DenseUNet3D().to(device)
    trained = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimiser = torch.optim.Adam(trained.parameters(), lr=settings.learning_rate)
    schedule = ddp.cosine_schedule(optimiser, settings.steps)
    stats = [normalisation(volume.input) for volume in volumes]
    start, running = time.perf_counter(), []
    for step in range(1, settings.steps + 1):
        x, y = _batch(volumes, stats, settings, rng)
        loss = torch.nn.functional.mse_loss(trained(x.to(device)), y.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        running.append(loss.item())
        if log is not None and rank == 0 and (step % 50 == 0 or step == settings.steps):
            log({"step": step, "loss": float(np.mean(running)), "lr": schedule.get_last_lr()[0],
                 "seconds": round(time.perf_counter() - start, 1)})
            running = []
    ddp.stop(distributed)
    return model.eval()


def training_metadata(target: str, obnlm: ObnlmSettings, settings: TrainingSettings, data: dict,
                      wall_seconds: float, device: str, world_size: int) -> dict:
    return {
        "us3d_version": __version__,
        "architecture": {"name": "DenseUNet3D", "widths": list(DenseUNet3D().widths)},
        "normalisation": "per frame: (x - mean) / std over the whole frame; output * std + mean",
        "target": target,
        "obnlm": dataclasses.asdict(obnlm) if target == "obnlm" else None,
        "training": dict(dataclasses.asdict(settings), data=data, wall_seconds=round(wall_seconds),
                         device=device, processes=world_size, torch=torch.__version__),
    }


def write_log_line(path: Path) -> Callable[[dict], None]:
    def log(entry: dict) -> None:
        with open(path, "a") as stream:
            stream.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)
    return log


def model_card(name: str, metadata: dict, validation: list[dict]) -> str:
    """Markdown model card: data, target, training run and held-out validation figures."""
    training = metadata["training"]
    data = training["data"]
    target = ("OBNLM output (" + ", ".join(f"{k}={v}" for k, v in metadata["obnlm"].items()) + ")"
              if metadata["target"] == "obnlm" else "the simulator's speckle-free echogenicity (ground truth)")
    lines = [
        f"# Model card: {name}",
        "",
        f"3D dense U-Net despeckler (us3d {metadata['us3d_version']}), TorchScript, any input size "
        "(j, i padded to multiples of 16; large volumes tiled).",
        "",
        f"- **Target**: {target}.",
        f"- **Input normalisation**: {metadata['normalisation']}.",
        f"- **Architecture**: DenseUNet3D, level widths {metadata['architecture']['widths']}, "
        f"{metadata['parameters']:,} parameters, {metadata['gflops_128x128x32']:.1f} GFLOP per 128x128x32 volume.",
        f"- **Training data**: {data['sequences']} simulated liver sequences x {data['frames']} frames "
        f"(seeds {data['seeds']})" + (f", plus the real volume {data['real']}" if data.get("real") else "") + ".",
        f"- **Training**: {training['steps']} steps of batch {training['batch_size']} random crops "
        f"{'x'.join(map(str, training['crop']))} (k x j x i), in-plane flips, gain {training['gain_range']}, "
        f"MSE loss, Adam lr {training['learning_rate']} with cosine decay, seed {training['seed']}.",
        f"- **Run**: {training['wall_seconds'] / 60:.0f} min wall time on {training['device']} "
        f"({training['processes']} process(es)), torch {training['torch']}.",
        f"- **Weights sha256**: `{metadata['weights_sha256']}`",
        "",
        "## Held-out validation (never trained on)",
        "",
        "PSNR against the target (grey levels, peak 255). SMPI against the input (lower = more speckle "
        "suppression with preserved mean).",
        "",
        "| volume | PSNR model vs target (dB) | PSNR input vs target (dB) | SMPI model | SMPI target | "
        "abs. SMPI gap |",
        "|---|---|---|---|---|---|",
    ]
    for row in validation:
        lines.append(f"| {row['volume']} | {row['psnr']:.2f} | {row['psnr_identity']:.2f} | {row['smpi_model']:.3f} "
                     f"| {row['smpi_target']:.3f} | {abs(row['smpi_model'] - row['smpi_target']):.3f} |")
    lines += ["", "Reproduce: see `Resources/Models/README.md`; figures: `make bench`.", ""]
    return "\n".join(lines)


def count_flops(model: torch.nn.Module, shape: tuple[int, int, int] = (32, 128, 128)) -> float:
    """Multiply-adds x 2 of all convolutions for one (k, j, i) volume."""
    total = [0.0]

    def hook(module, inputs, output):
        # A transposed convolution with stride = kernel adds cin products per output voxel.
        kernel = module.weight[0].numel() if not isinstance(module, torch.nn.ConvTranspose3d) else module.weight.shape[0]
        total[0] += 2.0 * kernel * output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    with torch.inference_mode():
        model(torch.zeros((1, 1) + shape))
    for handle in handles:
        handle.remove()
    return total[0]
