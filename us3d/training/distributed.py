"""What both trainers share: DDP set-up under torchrun, and the cosine learning-rate schedule."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist


def start(device: torch.device) -> tuple[bool, int, torch.device]:
    """(distributed, rank, device): joins the process group when run by torchrun (WORLD_SIZE > 1),
    gloo on the CPU, NCCL on CUDA (one GPU per local rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, 0, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return True, dist.get_rank(), device


def stop(distributed: bool) -> None:
    if distributed:
        dist.destroy_process_group()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cosine_schedule(optimiser: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate from its initial value down to 0 over `steps` along half a cosine."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
