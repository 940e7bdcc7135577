"""The device mesh PP × DP × CP × TP (outer → inner, docs/design.md#mesh-order), through megatron-core.

`parallel_state.initialize_model_parallel` builds every process group; its default order
"tp-cp-ep-dp-pp" (inner → outer) is exactly our mesh: TP ranks are adjacent (one node's
NVLink), then CP, then DP, and pipeline stages are furthest apart. `Mesh` is the small typed
view of one rank's coordinates that the rest of ratpt/parallel reads.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ratpt.config import ParallelConfig
from ratpt.parallel import cpu_compat
from ratpt.parallel.process_group import DistributedContext, collective_timeout


@dataclass(frozen=True)
class Mesh:
    tp: int
    pp: int
    cp: int
    dp: int
    virtual_stages: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        return (f"TP {self.tp} × PP {self.pp}" + (f" (×{self.virtual_stages} virtual)" if self.virtual_stages > 1 else "")
                + f" × CP {self.cp} × DP {self.dp}")


def init_mesh(parallel: ParallelConfig, ctx: DistributedContext) -> Mesh:
    """Create megatron-core's process groups for `parallel` on the running torchrun job."""
    from megatron.core import parallel_state as ps

    cpu_compat.install()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_stages if parallel.virtual_stages > 1 else None,
        context_parallel_size=parallel.context,
        order="tp-cp-ep-dp-pp",
        create_gloo_process_groups=ctx.device.type == "cuda",  # on CPU every group is gloo already
        distributed_timeout_minutes=collective_timeout().total_seconds() / 60,  # else its groups wait 30 minutes
    )
    return current_mesh(parallel.virtual_stages)


def current_mesh(virtual_stages: int = 1) -> Mesh:
    from megatron.core import parallel_state as ps

    return Mesh(
        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
        virtual_stages=virtual_stages,
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_mesh() -> None:
    """Forget megatron-core's process groups, if a mesh was built (megatron imported only by the runs that
    built one: looking costs nothing elsewhere)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def leave_distributed() -> None:
    """Destroy every process group once all ranks are done with them. A gloo group left for interpreter
    shutdown can abort a rank that finished its work (SIGABRT, "terminate called without an active
    exception": its worker threads outlive the interpreter), failing a run that succeeded."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    destroy_mesh()
    dist.destroy_process_group()


def on_gpu() -> bool:
    return torch.cuda.is_available()
