"""Process-group helpers that work the same in one process, under torchrun, local spawn and SLURM.

Rank and world size come from the standard variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), which torchrun, the local launcher and the SLURM launcher all set.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as torch_dist


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def init(device: torch.device, timeout_s: float = 1800) -> None:
    """Join the process group when the environment describes more than one process."""
    if world_size() > 1 and not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def shutdown() -> None:
    if is_initialized():
        torch_dist.destroy_process_group()


def mean_over_ranks(values: dict[str, Any], device: torch.device) -> dict[str, float]:
    """The mean of each scalar (number or tensor) over all ranks, as floats: one host synchronisation in all
    (every rank must call this with the same keys)."""
    if not values:
        return {}
    keys = sorted(values)
    packed = torch.stack([torch.as_tensor(values[k], device=device).detach().to(torch.float64).reshape(())
                          for k in keys])
    if is_initialized():
        torch_dist.all_reduce(packed)
        packed /= world_size()
    return dict(zip(keys, packed.tolist()))


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all ranks (a new tensor; no host synchronisation)."""
    value = value.clone()
    if is_initialized():
        torch_dist.all_reduce(value)
    return value


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
