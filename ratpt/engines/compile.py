"""FP8 projections, activation checkpointing and torch.compile of the plain model's blocks, before any
engine wraps it.

Applied in torchtitan's order (the FP8 module swap, then checkpointing, then compile) to the plain
model, so every engine runs the same compiled blocks: identical blocks share one graph (compiling
costs one block, not all of them) and the RAT kernels sit in it as opaque custom ops
(kernels/autograd.py). Compilation is lazy, so the blocks are traced at their first call, after the
engine has replaced projections (tensor parallelism), set the context shards or cast the weights:
the graph sees what runs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ratpt.config import Config, compiles, fp8_recipe


def compile_backend(cfg: Config, device: torch.device) -> Optional[str]:
    """The torch.compile backend of this run (train.compile, train.compile_backend), or None."""
    return cfg.train.compile_backend if compiles(cfg.train, device.type) else None


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward; the instance attribute keeps parameter names unchanged."""
    for layer in model.layers:
        layer.forward = _checkpointed(layer.forward)


def apply_compile(model: nn.Module, backend: str = "inductor", tuning: bool = False) -> None:
    """torch.compile each block's forward with static shapes. The block's own hooks stay outside the
    graph (an engine's per-block hooks, e.g. megatron's parameter all-gather, run eagerly around it).
    The loss: the fused head + loss compiles its per-chunk softmax (model.loss_compile_backend); the
    unfused one is compiled by the engine (ratpt.engines.loss.compiled_cross_entropy_sum).

    `tuning` (train.compile_tuning): inductor's coordinate-descent tuning of the blocks' generated
    kernels. An FP8 step spends a third of its time in the casts' pointwise and amax kernels
    (benchmarks/RESULTS.md#fp8-training-on-one-gpu), whose default block sizes leave bandwidth unused."""
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=False, backend=backend,
                                      options=compile_options(backend, tuning))
    model.loss_compile_backend = backend


def compile_options(backend: str, tuning: bool) -> Optional[dict[str, bool]]:
    """torch.compile's inductor options for the blocks: coordinate-descent tuning if asked (only inductor
    generates kernels to tune)."""
    return {"coordinate_descent_tuning": True} if tuning and backend == "inductor" else None


def prepare_model(model: nn.Module, cfg: Config, device: torch.device) -> Optional[str]:
    """FP8 projections, activation checkpointing and compile of `model` as `cfg` asks; returns the compile
    backend (or None)."""
    if fp8_recipe(cfg.train) is not None:
        # NOTE: first, as torchtitan: checkpointing then recomputes, and compile then traces, the FP8 modules.
        # Imported here: torchao takes seconds to import and only FP8 runs need it.
        from ratpt.engines.fp8 import apply_fp8

        apply_fp8(model, cfg, device)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    backend = compile_backend(cfg, device)
    if backend is not None:
        apply_compile(model, backend, cfg.train.compile_tuning)
    return backend


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
