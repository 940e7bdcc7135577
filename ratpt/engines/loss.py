"""The loss of a micro-batch and the precision it runs in, shared by every engine.

Every engine sums token losses (never averages per micro-batch) and divides by the global number
of labelled tokens once, so accumulation and the parallel layout do not change a step's loss.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ratpt.ops.linear_cross_entropy import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "autocast_context", "cross_entropy_sum", "document_inputs", "labelled_tokens",
           "sum_cross_entropy", "uses_bf16"]


def uses_bf16(precision: str, device_type: str) -> bool:
    """train.precision, for every engine: auto is bf16 on CUDA and fp32 elsewhere."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast over fp32 master weights on CUDA; plain fp32 elsewhere unless asked."""
    if not uses_bf16(precision, device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def sum_cross_entropy(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                      precision: str, compile_backend: str | None = None, fused: bool = True) -> torch.Tensor:
    """Summed token loss of a micro-batch. `fused` (train.fused_loss): the model's head and loss in
    one chunked op (RATLM.forward with labels); else the logits, then the loss over them, compiled
    with `compile_backend` if given (train.compile)."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    documents = document_inputs(batch, device)
    with autocast_context(device, precision):
        if fused:
            return model(input_ids, labels=labels, **documents)
        logits = model(input_ids, **documents)
    return (compiled_cross_entropy_sum(compile_backend) if compile_backend else cross_entropy_sum)(logits, labels)


def document_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's `positions` keyword when the batch packs documents that do not see each other
    (data.document_masking), else nothing: the model is then called exactly as without masking."""
    return {"positions": batch["positions"].to(device, non_blocking=True)} if "positions" in batch else {}


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of logits [B, T, V] against labels [B, T] (IGNORE_INDEX skipped)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@functools.cache
def compiled_cross_entropy_sum(backend: str):
    """cross_entropy_sum through torch.compile: under inductor the fp32 upcast, log-softmax and their
    backward become passes over the bf16 logits, the largest tensors of a step, instead of fp32 copies."""
    return torch.compile(cross_entropy_sum, dynamic=False, backend=backend)


def labelled_tokens(micro_batches: Iterable[dict]) -> int:
    return int(sum((b["labels"] != IGNORE_INDEX).sum() for b in micro_batches))
