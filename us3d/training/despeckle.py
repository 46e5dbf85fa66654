"""Training of the 3D dense U-Net despeckler (`us3d train-despeckle`, `train_despeckle_model`).

Each training sample is a random crop (default 16x64x64 voxels, (k, j, i)) of a training source
(`us3d.training.data`), augmented the ways real B-mode varies:

- an in-plane zoom of 0.7-1.5 per axis (speckle grain relative to the voxel grid);
- in-plane transposes and flips (depth along j or i, either side up: all 8 orientations);
- for the OBNLM target, the grey levels: gamma 0.6-1.6, a lifted floor under the non-zero voxels,
  saturation of the brightest voxels and 8-bit rounding.

The OBNLM target is then computed on the augmented crop itself, so every crop is a new exact
(input, OBNLM output) pair. The model sees both through its input mapping (`INPUT_MAPPINGS`):
"obnlm-range" for the OBNLM target (OBNLM's own min-max grey levels, which its weights depend on),
"standardise" for the clean target. MSE loss, Adam with cosine learning-rate decay. Seeded and,
on the CPU, deterministic. Under `torchrun` (WORLD_SIZE > 1) it trains data-parallel with DDP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from us3d import __version__, metrics
from us3d.despeckling import ObnlmSettings, despeckle_array
from us3d.models.inference import normalisation, predict
from us3d.models.unet import DenseUNet3D
from us3d.training.data import TrainingVolume
from us3d.training import distributed as ddp

#: The model's input mapping for each target (see `us3d.models.inference.INPUT_MAPPINGS`).
INPUT_MAPPING = {"obnlm": "obnlm-range", "clean": "standardise"}


def architecture(target: str, obnlm: ObnlmSettings) -> dict:
    """`DenseUNet3D`'s arguments for a target: OBNLM slice by slice (the default) is a function of
    each slice alone, so its network convolves in-plane only (1x3x3 kernels, a third of the work per
    channel), and spends what that saves on wider levels; the clean target and OBNLM's 3D mode keep
    the paper's 3x3x3 kernels and widths."""
    if target == "obnlm" and obnlm.mode == "slicewise":
        return {"widths": (12, 24, 48, 64, 96), "growth": (6, 12, 24, 32, 48), "kernel": (1, 3, 3)}
    return {"widths": (8, 16, 32, 48, 64), "growth": (4, 8, 16, 24, 32), "kernel": (3, 3, 3)}


@dataclasses.dataclass
class TrainingSettings:
    steps: int = 3000
    batch_size: int = 4
    crop: tuple[int, int, int] = (16, 64, 64)  # (k, j, i) voxels; j, i multiples of 16
    learning_rate: float = 2e-3
    seed: int = 0
    zoom_range: tuple[float, float] = (0.7, 1.5)  # in-plane, per axis
    gamma_range: tuple[float, float] = (0.6, 1.6)  # OBNLM target only
    real_share: float = 0.35  # share of crops from real sources (OBNLM target)


def _draw_source(volumes: list[TrainingVolume], settings: TrainingSettings, rng: np.random.Generator) -> int:
    real = [n for n, v in enumerate(volumes) if v.valid is not None]
    simulated = [n for n, v in enumerate(volumes) if v.valid is None]
    if real and simulated:
        group = real if rng.random() < settings.real_share else simulated
    else:
        group = real or simulated
    return group[int(rng.integers(len(group)))]


def _crop(volume: TrainingVolume, settings: TrainingSettings,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """A zoomed crop of input (and stored target), shape settings.crop (k padded symmetrically if thin)."""
    k_size, j_size, i_size = settings.crop
    shape = volume.input.shape
    zoom = np.exp(rng.uniform(*np.log(settings.zoom_range), size=2))
    size = [min(k_size, shape[0]), min(shape[1], int(round(j_size / zoom[0]))),
            min(shape[2], int(round(i_size / zoom[1])))]
    for _ in range(20):
        corner = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, size)]
        region = tuple(slice(c, c + n) for c, n in zip(corner, size))
        if volume.valid is None or volume.valid[region].mean() > 0.6:
            break
    arrays = [volume.input[region]] + ([volume.target[region]] if volume.target is not None else [])
    out = []
    for array in arrays:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
        if tuple(tensor.shape[-2:]) != (j_size, i_size):
            tensor = F.interpolate(tensor, size=(tensor.shape[2], j_size, i_size), mode="trilinear",
                                   align_corners=False)
        array = tensor[0, 0].numpy()
        if array.shape[0] < k_size:  # thin sources (a 2D frame, a few slices): mirror along k
            array = np.pad(array, ((0, k_size - array.shape[0]), (0, 0), (0, 0)), mode="symmetric")
        out.append(array)
    return out[0], (out[1] if len(out) > 1 else None)


def _grey_levels(x: np.ndarray, settings: TrainingSettings, rng: np.random.Generator) -> np.ndarray:
    """Gamma, a lifted floor under the non-zero voxels, saturation, 8-bit rounding (0-255 input)."""
    peak = max(float(x.max()), 1.0)
    x = peak * (np.maximum(x, 0) / peak) ** rng.uniform(*settings.gamma_range)
    if rng.random() < 0.3:
        floor = rng.uniform(5.0, 60.0)
        x = np.where(x > 0, floor + x * (1 - floor / 255.0), 0.0)
    if rng.random() < 0.2:
        x = np.minimum(x, np.percentile(x, rng.uniform(97.0, 99.9)))
    if rng.random() < 0.5:
        x = np.round(x)
    return x.astype(np.float32)


def training_pair(volume: TrainingVolume, target: str, settings: TrainingSettings, obnlm: ObnlmSettings,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (input, target) crop, both normalised by the target's input mapping."""
    for _ in range(20):
        x, y = _crop(volume, settings, rng)
        if rng.random() < 0.5:
            x, y = np.swapaxes(x, 1, 2), (None if y is None else np.swapaxes(y, 1, 2))
        for axis in (1, 2):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), (None if y is None else np.flip(y, axis))
        x = np.ascontiguousarray(x)
        if target == "obnlm":
            x = _grey_levels(x, settings, rng)
        if x.max() > x.min():
            break
    if target == "obnlm":
        y = despeckle_array(x, obnlm, "cpu")
    offset, scale = normalisation(x, INPUT_MAPPING[target])
    return (x - offset) / scale, (np.ascontiguousarray(y) - offset) / scale


def train_despeckler(volumes: list[TrainingVolume], target: str, settings: TrainingSettings, obnlm: ObnlmSettings,
                     device: torch.device, log: Callable[[dict], None] | None = None) -> DenseUNet3D:
    """Train a DenseUNet3D (`architecture`) on augmented crops of `volumes`; returns the model (rank
    0's copy under DDP)."""
    distributed, rank, device = ddp.start(device)
    torch.manual_seed(settings.seed)  # same initial weights on every rank
    rng = np.random.default_rng([settings.seed, rank])
    model = DenseUNet3D(**architecture(target, obnlm)).to(device)
    trained = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimiser = torch.optim.Adam(trained.parameters(), lr=settings.learning_rate)
    schedule = ddp.cosine_schedule(optimiser, settings.steps)
    start, running = time.perf_counter(), []
    for step in range(1, settings.steps + 1):
        pairs = [training_pair(volumes[_draw_source(volumes, settings, rng)], target, settings, obnlm, rng)
                 for _ in range(settings.batch_size)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None]).float().to(device)
        y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None]).float().to(device)
        loss = torch.nn.functional.mse_loss(trained(x), y)
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


def validate(module: torch.nn.Module, volumes: list[TrainingVolume], device: torch.device,
             mapping: str = "standardise") -> list[dict]:
    """PSNR against the target (grey levels, peak 255: the volumes are 8-bit B-mode) and SMPI (the
    paper's scale, `metrics.smpi`) of output and target, per held-out volume; inside `valid` where a
    volume has such a mask."""
    rows = []
    for volume in volumes:
        output = predict(module.eval(), volume.input[None], device, mapping=mapping)[0].astype(np.float64)
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


def training_metadata(target: str, obnlm: ObnlmSettings, settings: TrainingSettings, data: dict,
                      wall_seconds: float, device: str, world_size: int) -> dict:
    mapping = INPUT_MAPPING[target]
    return {
        "us3d_version": __version__,
        "architecture": dict({key: list(value) for key, value in architecture(target, obnlm).items()},
                             name="DenseUNet3D"),
        "input_mapping": mapping,
        "normalisation": ("per frame: OBNLM's grey levels, (x - min) / (max - min) * 255 + 100, centred on 227.5 "
                          "and divided by 64" if mapping == "obnlm-range" else
                          "per frame: (x - mean) / std over the whole frame") + "; the output is mapped back",
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


def _group(name: str) -> str:
    kind = ("standard simulator" if name.startswith("standard") else "varied simulator" if name.startswith("varied")
            else name.split(" ")[0] + " (real)")
    return kind + (", j and i swapped" if name.endswith("(j, i swapped)") else ", as acquired")


def validation_summary(validation: list[dict]) -> list[dict]:
    """Per held-out group (source and orientation): mean and worst PSNR, gain over the input, SMPI gap."""
    groups: dict[str, list[dict]] = {}
    for row in validation:
        groups.setdefault(_group(row["volume"]), []).append(row)
    return [{"group": name, "volumes": len(rows),
             "psnr_mean": float(np.mean([r["psnr"] for r in rows])), "psnr_worst": min(r["psnr"] for r in rows),
             "gain_worst": min(r["psnr"] - r["psnr_identity"] for r in rows),
             "smpi_gap_worst": max(abs(r["smpi_model"] - r["smpi_target"]) for r in rows)}
            for name, rows in groups.items()]


def _kernel_text(kernel: list[int]) -> str:
    if list(kernel) == [1, 3, 3]:
        return ("1x3x3 (in-plane) convolutions (the slice-wise target depends on each slice alone, so each "
                "output slice is computed from its own input slice; a third of the work per channel, spent on "
                "wider levels)")
    return "x".join(map(str, kernel)) + " convolutions"


def model_card(name: str, metadata: dict, validation: list[dict]) -> str:
    """Markdown model card: data, target, training run and held-out validation figures."""
    training = metadata["training"]
    data = training["data"]
    target = ("OBNLM output (" + ", ".join(f"{k}={v}" for k, v in metadata["obnlm"].items()) + "), computed on "
              "every augmented training crop" if metadata["target"] == "obnlm"
              else "the simulator's speckle-free echogenicity (ground truth, which exists only in simulation)")
    real = data.get("real") or []
    lines = [
        f"# Model card: {name}",
        "",
        f"3D dense U-Net despeckler (us3d {metadata['us3d_version']}), TorchScript, any input size "
        "(j, i padded to multiples of 16; large volumes tiled).",
        "",
        f"- **Target**: {target}.",
        f"- **Input mapping**: `{metadata['input_mapping']}`, {metadata['normalisation']}.",
        f"- **Architecture**: DenseUNet3D, level widths {metadata['architecture']['widths']}, "
        f"{_kernel_text(metadata['architecture'].get('kernel', [3, 3, 3]))}, "
        f"{metadata['parameters']:,} parameters, {metadata['gflops_128x128x32']:.1f} GFLOP per 128x128x32 volume.",
        f"- **Training data**: {data['standard']} simulated volumes of the standard configuration (seeds "
        f"{data['standard_seeds']}) and {data['varied']} with imaging drawn from wide ranges (seeds "
        f"{data['varied_seeds']}: PSF widths, frequency, bandwidth, scatterer density, dynamic range 40-70 dB, gain, "
        "noise floor, attenuation with TGC, sector geometry)"
        + (f"; real B-mode: {', '.join(real)} ({training['real_share']:.0%} of the crops)" if real else "") + ".",
        f"- **Held out** (never trained on): {data['held_out']}."
        + (" MouseLiverB is the B-mode of the same mouse scan whose RF (MouseLiverRF, made B-mode here with "
           "another envelope, decimation and dynamic range) is trained on: its speckle is new to the model, its "
           "anatomy is not." if "MouseLiverRF.mha" in real else ""),
        f"- **Training**: {training['steps']} steps of batch {training['batch_size']} random crops "
        f"{'x'.join(map(str, training['crop']))} (k x j x i); in-plane zoom {training['zoom_range'][0]}-"
        f"{training['zoom_range'][1]} per axis, in-plane transposes and flips"
        + (f", gamma {training['gamma_range'][0]}-{training['gamma_range'][1]}, lifted floor, saturation, "
           "8-bit rounding" if metadata["target"] == "obnlm" else "")
        + f"; MSE loss, Adam lr {training['learning_rate']} with cosine decay, seed {training['seed']}.",
        f"- **Run**: {training['wall_seconds'] / 60:.0f} min wall time on {training['device']} "
        f"({training['processes']} process(es), {data.get('threads') or 'default'} thread(s)), "
        f"torch {training['torch']}. No GPU was used unless the device says cuda.",
        f"- **Weights sha256**: `{metadata['weights_sha256']}`",
        "- **Inference**: on the CPU the network runs rebuilt with oneDNN convolutions (`us3d.models.unet.for_inference`), "
        "in bfloat16 where the CPU has it natively (AVX-512 BF16 or AMX): about half the time, at >= 45 dB PSNR against "
        "float32 (`Testing/test_unet.py`; unet-obnlm: 69 dB in `benchmarks/RESULTS-device-cpu.md`). The validation "
        "below is in float32.",
        "",
        "## Held-out validation (never trained on)",
        "",
        "PSNR against the target (grey levels, peak 255), next to the PSNR of the unchanged input; SMPI on the "
        "paper's scale (`us3d.metrics.smpi`, lower = more speckle suppression with preserved mean). Inside the "
        "non-zero voxels for real volumes. Worst case per group:",
        "",
        "| held-out group | volumes | PSNR mean (dB) | PSNR worst (dB) | worst gain over input (dB) | "
        "worst SMPI gap |",
        "|---|---|---|---|---|---|",
    ]
    for row in validation_summary(validation):
        lines.append(f"| {row['group']} | {row['volumes']} | {row['psnr_mean']:.2f} | {row['psnr_worst']:.2f} | "
                     f"{row['gain_worst']:+.2f} | {row['smpi_gap_worst']:.3f} |")
    lines += ["", "Every volume:", "",
              "| volume | PSNR model vs target (dB) | PSNR input vs target (dB) | SMPI model | SMPI target | "
              "abs. SMPI gap |",
              "|---|---|---|---|---|---|"]
    for row in validation:
        lines.append(f"| {row['volume']} | {row['psnr']:.2f} | {row['psnr_identity']:.2f} | {row['smpi_model']:.3f} "
                     f"| {row['smpi_target']:.3f} | {abs(row['smpi_model'] - row['smpi_target']):.3f} |")
    if metadata["target"] == "clean":
        lines += ["", "## On real data", "",
                  "Its truth exists only in simulation, so on real B-mode the output can only be looked at: "
                  "`benchmarks/unet-real.png` (written by `benchmarks/bench_unet.py`) shows the B-mode plane of the "
                  "held-out MouseLiverB and of the spine-phantom reconstruction, left to right input | OBNLM | "
                  "unet-obnlm | unet-sim. " + REAL_DATA_NOTE,
                  "", "![input, OBNLM, unet-obnlm, unet-sim on real volumes](../../benchmarks/unet-real.png)"]
    lines += ["", "Reproduce: see `Resources/Models/README.md`; figures: `make bench`.", ""]
    return "\n".join(lines)


#: What unet-sim's output looks like on real volumes (benchmarks/unet-real.png), for its model card.
REAL_DATA_NOTE = ("On both, unet-sim removes the speckle texture completely and returns smooth, piecewise "
                  "flat regions: in the mouse liver the vessels and the dark lesion-like region stay, with some "
                  "blocky, streaky patches where the simulator has no counterpart; in the spine phantom the bright "
                  "bone echoes stay as soft blobs and everything finer is gone. It is a strong smoother toward what "
                  "the simulator calls tissue, not a faithful one for real anatomy: use it for display and "
                  "registration experiments, and unet-obnlm or OBNLM where real texture matters.")


def rewrite_model_card(path: str | os.PathLike) -> Path:
    """Write the model card (.md beside `path`) again from the metadata stored in the model file."""
    from us3d.models.bundle import load_model

    loaded = load_model(str(path))
    card = Path(path).with_suffix(".md")
    card.write_text(model_card(Path(path).stem, loaded.metadata, loaded.metadata["validation"]))
    return card


def train_despeckle_model(output: str | os.PathLike, target: str, settings: TrainingSettings,
                          standard: int = 8, varied: int = 48, include_real: bool = True, device: str = "auto",
                          cache: str | os.PathLike | None = None, threads: int | None = None) -> list[dict]:
    """Train the despeckling U-Net for `target` ("obnlm" or "clean") and write the TorchScript model
    `output` (.pt) with its model card (.md) and training log (.log.jsonl); a model written into
    Resources/Models/ is entered in the manifest. Returns the held-out validation rows (empty on
    ranks other than 0 under torchrun)."""
    from us3d.devices import resolve_device
    from us3d.models.bundle import MODELS_DIR, save_model, update_manifest, weights_sha256
    from us3d.training import data as sources

    output = Path(output)
    used = resolve_device(device)
    cache = Path(cache) if cache is not None else None
    obnlm = ObnlmSettings()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    volumes = sources.training_sources(target, standard, varied, include_real, cache)
    log_path = output.with_suffix(".log.jsonl")
    if rank0 and log_path.exists():
        log_path.unlink()
    start = time.perf_counter()
    model = train_despeckler(volumes, target, settings, obnlm, used, write_log_line(log_path) if rank0 else None)
    wall = time.perf_counter() - start
    if not rank0:
        return []
    first, second = sources.TRAINING_SEED_START, sources.VARIED_TRAINING_SEED_START
    real = list(sources.REAL_TRAINING) if include_real and target == "obnlm" else []
    held_out = (f"standard simulator seeds {', '.join(map(str, sources.VALIDATION_SEEDS))}; varied simulator seeds "
                f"{', '.join(map(str, sources.VARIED_VALIDATION_SEEDS))}"
                + (f"; the real {sources.REAL_VALIDATION}" if target == "obnlm" else "")
                + "; each also with j and i swapped")
    data = {"standard": standard, "standard_seeds": f"{first}-{first + standard - 1}", "varied": varied,
            "varied_seeds": f"{second}-{second + varied - 1}", "real": real, "held_out": held_out,
            "threads": threads}
    metadata = training_metadata(target, obnlm, settings, data, wall, used.type, ddp.world_size())
    model = model.cpu()
    metadata["parameters"] = sum(p.numel() for p in model.parameters())
    metadata["gflops_128x128x32"] = round(count_flops(model) / 1e9, 2)
    validation = validate(model, sources.validation_set(target, obnlm, cache), torch.device("cpu"),
                          INPUT_MAPPING[target])
    metadata["validation"] = validation
    digest = save_model(model, output, metadata)
    output.with_suffix(".md").write_text(model_card(output.stem, dict(metadata, weights_sha256=weights_sha256(model)),
                                                    validation))
    if output.resolve().parent == MODELS_DIR.resolve():
        update_manifest(output.stem, output.name, digest, target)
    return validation


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
