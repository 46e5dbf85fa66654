"""Choice of the torch device from a user setting ("auto", "cpu" or "cuda")."""

from __future__ import annotations

import torch

from us3d.errors import InputError
from us3d.options import DEVICES as DEVICE_CHOICES


def resolve_device(device: str = "auto") -> torch.device:
    """torch.device for "auto" (CUDA when available, else CPU), "cpu" or "cuda"."""
    if device not in DEVICE_CHOICES:
        raise InputError(f"device must be one of {', '.join(DEVICE_CHOICES)}, not {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available; choose the device 'cpu' or 'auto'")
    return torch.device(device)
