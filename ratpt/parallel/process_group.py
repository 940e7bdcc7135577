"""Joining torchrun's process group: this rank, the world size and the device.

A plain `python -m ratpt train` is one process with no process group; under torchrun the
processes form the mesh of `parallel` (ratpt.parallel.mesh; gloo on CPU, NCCL on CUDA) and the
ranks left over after TP × PP × CP are data-parallel replicas (megatron DDP, ratpt.engines.megatron_engine).

A collective that waits longer than RATPT_COLLECTIVE_TIMEOUT seconds (default 30 minutes) raises
instead of hanging, so a lost rank fails the job; the SLURM launcher sets it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ratpt.config import ConfigError


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def collective_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("RATPT_COLLECTIVE_TIMEOUT", 30 * 60)))


def init_distributed(device_kind: str, group_of_one: bool = False) -> DistributedContext:
    """Join torchrun's process group if launched by it; pick this rank's device. `group_of_one`: a
    process group even for a single process, which megatron-core's engine needs to run there (the
    benchmarks and tests that drive it on one device)."""
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available: use train.device=auto or cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=collective_timeout(),
        )
    elif group_of_one and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=collective_timeout())
    return DistributedContext(rank, world_size, local_rank, device)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
    return value
