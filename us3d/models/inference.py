"""U-Net inference on volumes of any size: normalisation, padding, tiling with blended seams.

Volumes are (k, j, i) arrays and sequences (t, k, j, i). The model sees each frame shifted and
scaled by one of INPUT_MAPPINGS, computed over the whole frame so that tiles agree, with j and i
padded to multiples of 16; the output is scaled back and cropped. A model's metadata names its
mapping ("input_mapping"; models without it were trained with "standardise").
"""

from __future__ import annotations

import itertools
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from us3d.models.unet import SIZE_MULTIPLE

#: Largest tile (k, j, i) in voxels per axis (plus up to TILE_OVERLAP, see `tile_layout`); bigger
#: volumes are split into overlapping tiles.
DEFAULT_TILE = (64, 256, 256)
#: Overlap of neighbouring tiles (k, j, i) in voxels, blended with linear ramps.
TILE_OVERLAP = (8, 32, 32)


#: How a frame is normalised for the model: "standardise" = (x - mean) / std; "obnlm-range" = OBNLM's own
#: intensity mapping (min-max to [0, 255] + 100, see `us3d.filters.obnlm`) centred and divided by 64, so the
#: model sees the grey levels OBNLM's weights depend on.
INPUT_MAPPINGS = ("standardise", "obnlm-range")


def normalisation(volume: np.ndarray, mapping: str = "standardise") -> tuple[float, float]:
    """(offset, scale) with normalised = (volume - offset) / scale; scale is 1 for a constant frame."""
    if mapping == "standardise":
        offset, scale = float(volume.mean(dtype=np.float64)), float(volume.std(dtype=np.float64))
    elif mapping == "obnlm-range":
        low, high = float(volume.min()), float(volume.max())
        # (x - low) / (high - low) * 255 + 100 is centred on 227.5 and divided by 64
        offset, scale = low + (high - low) / 2, (high - low) * 64.0 / 255.0
    else:
        raise ValueError(f"input mapping must be one of {', '.join(INPUT_MAPPINGS)}, not {mapping!r}")
    return offset, scale if scale > 0 else 1.0


def tile_layout(size: int, tile: int, overlap: int, multiple: int = 1) -> tuple[int, list[int]]:
    """(tile length, tile starts) along one axis of `size` voxels: the fewest tiles, all of one
    length, evenly spread, neighbours overlapping by at least `overlap`. A tile may be up to `overlap`
    voxels longer than `tile` when that saves a whole tile (512 voxels: two tiles of 272, not three
    of 256); lengths are multiples of `multiple` unless a tile spans the axis. The work per voxel
    along the axis is then about 1 + (tiles - 1) * overlap / size."""
    if size <= tile:
        return size, [0]
    count = 2
    while True:
        length = -(-(size + (count - 1) * overlap) // count)
        length = min(size, -(-length // multiple) * multiple)
        if length <= tile + overlap or length <= multiple:  # (a tile cannot be shorter than `multiple`)
            break
        count += 1
    starts = [round(n * (size - length) / (count - 1)) for n in range(count)]
    return length, starts


def _ramp(length: int, overlap: int, first: bool, last: bool) -> np.ndarray:
    """Blending weights along one axis of a tile: the outer quarter of each overlap, where the
    model sees the tile's edge, is dropped (weight 0); a linear ramp spans the rest."""
    ramp = np.ones(length, np.float32)
    if overlap == 0:  # tiles that need no overlap (along k for an in-plane network) are simply averaged
        return ramp
    margin = overlap // 4
    distance = np.arange(overlap, dtype=np.float32)
    rise = np.clip((distance - margin + 1) / (overlap - 2 * margin + 1), 0.0, 1.0)
    if not first:
        ramp[:overlap] = np.minimum(ramp[:overlap], rise)
    if not last:
        ramp[-overlap:] = np.minimum(ramp[-overlap:], rise[::-1])
    return ramp


def _run_padded(module: torch.jit.ScriptModule, batch: torch.Tensor) -> torch.Tensor:
    """module on (b, 1, k, j, i) with j and i padded (edge values) to multiples of 16, cropped back."""
    j, i = batch.shape[-2:]
    pad_j, pad_i = (-j) % SIZE_MULTIPLE, (-i) % SIZE_MULTIPLE
    if pad_j or pad_i:
        batch = F.pad(batch, (0, pad_i, 0, pad_j, 0, 0), mode="replicate")
    return module(batch)[..., :j, :i]


def _predict_normalised(module, frames: torch.Tensor, tile: tuple[int, int, int], batch_frames: int) -> torch.Tensor:
    """Model output for normalised frames (t, k, j, i) on the module's device, tiled."""
    t, *shape = frames.shape
    tile = tuple(min(s, m) for s, m in zip(shape, tile))
    overlap = tuple(min(o, m // 4) for o, m in zip(TILE_OVERLAP, tile))
    if tuple(getattr(module, "kernel", (3, 3, 3)))[0] == 1:  # in-plane network: each slice on its own,
        overlap = (0,) + overlap[1:]  # so tiles along k need no overlap
    layouts = [tile_layout(s, m, o, multiple) for s, m, o, multiple in
               zip(shape, tile, overlap, (1, SIZE_MULTIPLE, SIZE_MULTIPLE))]
    tile = tuple(length for length, _ in layouts)
    starts = [axis_starts for _, axis_starts in layouts]
    if all(len(s) == 1 for s in starts):
        outputs = [_run_padded(module, frames[b:b + batch_frames, None])[:, 0]
                   for b in range(0, t, batch_frames)]
        return torch.cat(outputs)
    result = torch.zeros(frames.shape, dtype=torch.float32, device=frames.device)
    weight_sum = torch.zeros(shape, dtype=torch.float32, device=frames.device)
    for corner in itertools.product(*starts):
        region = tuple(slice(c, c + m) for c, m in zip(corner, tile))
        ramps = [_ramp(m, o, c == 0, c + m == s) for c, m, o, s in zip(corner, tile, overlap, shape)]
        weight = torch.from_numpy(np.einsum("k,j,i->kji", *ramps)).to(frames.device, torch.float32)
        for b in range(0, t, batch_frames):
            piece = _run_padded(module, frames[(slice(b, b + batch_frames), None) + region])[:, 0]
            result[(slice(b, b + batch_frames),) + region] += piece.float() * weight
        weight_sum[region] += weight
    return result / weight_sum


def run_with_fallback(attempt: Callable[[torch.device, tuple[int, int, int], int], np.ndarray],
                      device: torch.device, tile: tuple[int, int, int], batch_frames: int) -> np.ndarray:
    """attempt(device, tile, batch_frames), retried after CUDA out-of-memory errors: fewer frames
    per batch, then halved tiles (down to 32x64x64), then the CPU; a warning each time."""
    while True:
        try:
            return attempt(device, tile, batch_frames)
        except torch.cuda.OutOfMemoryError:
            if device.type != "cuda":
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if batch_frames > 1:
                batch_frames = max(1, batch_frames // 2)
                warnings.warn(f"CUDA out of memory: retrying with {batch_frames} frame(s) per batch")
            elif tile[1] > 64 or tile[2] > 64:
                tile = (max(32, tile[0] // 2), max(64, tile[1] // 2), max(64, tile[2] // 2))
                warnings.warn(f"CUDA out of memory: retrying with tiles of {tile[0]}x{tile[1]}x{tile[2]} voxels")
            else:
                warnings.warn("CUDA out of memory even with small tiles: running on the CPU instead")
                device = torch.device("cpu")


def predict(module: torch.jit.ScriptModule, frames: np.ndarray, device: torch.device,
            tile: tuple[int, int, int] = DEFAULT_TILE, batch_frames: int | None = None,
            mapping: str = "standardise") -> np.ndarray:
    """Despeckled frames (t, k, j, i) float32 from input frames (t, k, j, i), any real dtype.

    `mapping` is the model's input normalisation (INPUT_MAPPINGS). Frames are fed in the precision of
    the module's parameters (a module cast to bfloat16 runs in bfloat16). On CUDA, frames are
    batched; out-of-memory errors are handled by `run_with_fallback`.
    """
    if frames.ndim != 4:
        raise ValueError("frames must be a (t, k, j, i) array")
    if batch_frames is None:
        batch_frames = 8 if device.type == "cuda" else 1
    stats = [normalisation(frame, mapping) for frame in frames]
    normalised = np.stack([(frame.astype(np.float32) - m) / s for frame, (m, s) in zip(frames, stats)])

    def attempt(device: torch.device, tile: tuple[int, int, int], batch_frames: int) -> np.ndarray:
        with torch.inference_mode():
            on_device = module.to(device)
            parameter = next(on_device.parameters(), None)
            dtype = torch.float32 if parameter is None else parameter.dtype
            output = _predict_normalised(on_device, torch.from_numpy(normalised).to(device, dtype), tile, batch_frames)
            return output.float().cpu().numpy()

    output = run_with_fallback(attempt, device, tile, batch_frames)
    return np.stack([out * s + m for out, (m, s) in zip(output, stats)]).astype(np.float32)
