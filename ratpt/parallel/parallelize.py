"""Turn the plain model into this rank's part of a parallel layout, as a sequence of named steps.

    1. tensor parallelism   megatron column/row-parallel linears, vocab-parallel embedding and head,
                            sequence parallelism for norms and residuals (tensor_parallel.py)
    2. context parallelism  each mixer gets this rank's `ContextShard`: whole chunks per rank
    3. pipeline stages      FLOP-balanced contiguous layer runs, one per (virtual) stage (pipeline.py)
    4. data parallelism     megatron DDP + distributed optimizer, in MegatronEngine

Every rank builds the same plain model from the same seed first, so a parallel run starts from
exactly the weights of a single-process run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ratpt.config import Config, ConfigError
from ratpt.parallel.context_parallel import apply_context_parallel
from ratpt.parallel.mesh import Mesh
from ratpt.parallel.pipeline import ModelStage, pipeline_chunks
from ratpt.parallel.tensor_parallel import Placement, VocabParallelHead, apply_tensor_parallel


class LayoutNotSupported(ConfigError):
    """A parallel layout this version cannot run; the message says which key to change (so the command line
    prints it without a traceback)."""


@dataclass
class ParallelModel:
    """This rank's model chunks (one per virtual pipeline stage) and where their TP shards sit
    in the plain model (empty without tensor parallelism)."""
    chunks: list[ModelStage]
    placements: dict[str, Placement] = field(default_factory=dict)


def parallelize(model: nn.Module, cfg: Config, mesh: Mesh, megatron_config) -> ParallelModel:
    from megatron.core import parallel_state as ps

    placements: dict[str, Placement] = {}
    head = None
    if mesh.tp > 1:
        # NOTE: first, on the whole model: it replaces the projections that CP and PP then use as they are.
        try:
            placements = apply_tensor_parallel(model, megatron_config, mesh.tp_rank, mesh.tp)
        except ValueError as err:
            raise LayoutNotSupported(str(err)) from None
        head = VocabParallelHead(cfg.model.vocab_size, cfg.model.d_model, megatron_config)
    if mesh.cp > 1:
        # NOTE: after TP (which replaces the projections) and before PP (which splits the layers).
        apply_context_parallel(model, ps.get_context_parallel_group(), mesh.cp_rank, mesh.cp,
                               cfg.parallel.context_layout)
    chunks = pipeline_chunks(model, cfg.data.seq_len, mesh.pp, mesh.pp_rank, mesh.virtual_stages, head=head)
    if mesh.pp > 1:
        for chunk in chunks:
            if chunk.last and not chunk.first:  # the last stage's copy of the tied embedding
                p = placements.get("embedding.weight")
                if p is not None:
                    placements["output_weight"] = Placement(p.plain, p.dim, p.size, p.index, duplicate=True)
                else:
                    placements["output_weight"] = Placement("embedding.weight", 0, cfg.model.vocab_size,
                                                            (), replicated=True, duplicate=True)
    return ParallelModel(chunks, placements)
