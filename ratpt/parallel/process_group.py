"""Joining torchrun's process group: this rank, the world size and the device.

A plain `python -m ratpt train` is one process with no process group; under torchrun the
processes form the mesh of `parallel` (ratpt.parallel.mesh; gloo on CPU, NCCL on CUDA) and the
ranks left over after TP × PP × CP are data-parallel replicas (megatron DDP, ratpt.engines.megatron_engine).

A collective that waits longer than RATPT_COLLECTIVE_TIMEOUT seconds (default 30 minutes) raises
instead of hanging, so a lost rank fails the job; the SLURM launcher sets it. Every process group
takes it: the world group here, megatron-core's (ratpt.parallel.mesh), DeepSpeed's (ratpt.engines.
deepspeed_engine); a new group does not inherit the world group's timeout.
"""
from __future__ import annotations

import datetime
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from ratpt.config import ConfigError

T = TypeVar("T")


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than RATPT_COLLECTIVE_TIMEOUT: another rank is hung, stopped or gone."""


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


@contextmanager
def naming_collective_timeouts() -> Iterator[None]:
    """Turn a collective's timeout inside the block into a CollectiveTimeout that says what it means and
    what to do (gloo raises a RuntimeError "Timed out waiting …"; NCCL's watchdog aborts the process
    with its own message)."""
    try:
        yield
    except RuntimeError as err:
        if "Timed out" not in str(err):
            raise
        seconds = collective_timeout().total_seconds()
        raise CollectiveTimeout(
            f"rank {dist.get_rank() if dist.is_initialized() else 0}: a collective waited longer than "
            f"RATPT_COLLECTIVE_TIMEOUT={seconds:g} s, so another rank is hung, stopped or gone (its log says "
            f"which); the run stops and resumes from its last checkpoint when started again. If a step or a "
            f"checkpoint save legitimately takes longer, raise RATPT_COLLECTIVE_TIMEOUT") from err


def on_rank0(fn: Callable[[], T]) -> T:
    """`fn()` run by rank 0 alone, its result handed to every rank (collective): a decision of rank 0
    (a lock taken, a file written, a checkpoint chosen) that the others wait for. Its error is raised on
    every rank, so no rank is left waiting in a collective for one that failed. Without a process
    group: `fn()`."""
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    outcome: list[Any] = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            outcome = [(fn(), None)]
        except Exception as err:
            error = err
            outcome = [(None, err if _picklable(err) else RuntimeError(str(err)))]
    dist.broadcast_object_list(outcome, src=0)
    result, sent = outcome[0]
    if sent is not None:
        raise error or sent
    return result


def _picklable(value: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
    except Exception:
        return False
    return True


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

