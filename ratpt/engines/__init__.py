"""The engines: how one training step runs on this rank (ratpt.engines.contract.Engine).

    LocalEngine      one process, plain PyTorch AdamW; no megatron import
    MegatronEngine   any layout of TP × PP × CP × DP through megatron-core (several processes)
    DeepSpeedEngine  ZeRO 1-3 over DP × CP (`train.engine: deepspeed`)

Every engine runs the plain model prepared by `prepare_model` (activation checkpointing, compile)
and saves checkpoints that every other engine layout resumes (DeepSpeed's after consolidation).
"""
from __future__ import annotations

import logging

from torch import nn

from ratpt.config import Config
from ratpt.engines.compile import prepare_model
from ratpt.engines.contract import Engine
from ratpt.engines.local_engine import LocalEngine
from ratpt.parallel.process_group import DistributedContext

__all__ = ["Engine", "LocalEngine", "build_engine"]

log = logging.getLogger(__name__)


def build_engine(cfg: Config, ctx: DistributedContext, model: nn.Module) -> Engine:
    """Prepare `model` (the plain model, built alike on every rank) and wrap it in the engine of this run:
    DeepSpeed ZeRO if `train.engine` says so; else LocalEngine for one process, megatron-core for several."""
    backend = prepare_model(model, cfg, ctx.device)
    if cfg.train.engine == "deepspeed":
        from ratpt.engines.deepspeed_engine import DeepSpeedEngine  # NOTE: imports deepspeed only when asked

        return DeepSpeedEngine(cfg, ctx, model, backend)
    if ctx.world_size == 1:
        if cfg.checkpoint.format == "distributed":
            log.info("one process: checkpoints are written gathered (checkpoint.format=distributed needs several)")
        return LocalEngine(cfg, ctx, model, backend)
    from ratpt.engines.megatron_engine import MegatronEngine  # NOTE: megatron-core takes seconds to import

    return MegatronEngine(cfg, ctx, model, backend)
