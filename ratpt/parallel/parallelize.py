"""Turn the plain model into this rank's part of a parallel layout, as a sequence of named steps.

    1. tensor parallelism   (megatron column/row-parallel linears + sequence parallelism)  [not yet]
    2. context parallelism  each mixer gets this rank's `ContextShard`: whole chunks per rank
    3. pipeline stages      (megatron schedules)                                          [not yet]
    4. data parallelism     megatron DDP + distributed optimizer, in MegatronEngine

Every rank builds the same plain model from the same seed first, so a parallel run starts from
exactly the weights of a single-process run.
"""
from __future__ import annotations

from torch import nn

from ratpt.config import Config
from ratpt.parallel.context_parallel import apply_context_parallel
from ratpt.parallel.mesh import Mesh
from ratpt.parallel.pipeline import whole_model_stage


class LayoutNotSupported(NotImplementedError):
    """A parallel layout this version cannot run yet; the message says which key to change."""


def parallelize(model: nn.Module, cfg: Config, mesh: Mesh) -> nn.Module:
    from megatron.core import parallel_state as ps

    if mesh.tp > 1:
        raise LayoutNotSupported("parallel.tensor > 1 is not implemented yet (issue 5, step 3): use parallel.tensor=1")
    if mesh.pp > 1:
        raise LayoutNotSupported("parallel.pipeline > 1 is not implemented yet (issue 5, step 4): "
                                 "use parallel.pipeline=1")
    if mesh.cp > 1:
        # NOTE: after TP (which replaces the projections) and before PP (which splits the layers).
        apply_context_parallel(model, ps.get_context_parallel_group(), mesh.cp_rank, mesh.cp)
    return whole_model_stage(model)
