"""The step of the training loop, behind one interface for every layout.

    engine.forward_backward(micro_batches) -> (sum of token losses, labelled tokens) of the global batch
    engine.clip_grad_norm(max_norm)        -> global grad norm before clipping
    engine.set_lr(lr); engine.step()       -> optimizer update
    engine.evaluate(batches)               -> (loss sum, tokens) over all ranks
    engine.state_dict() / load_state_dict  -> {"model", "optimizer"} in one layout-independent form

`LocalEngine` is one process, plain PyTorch AdamW: nothing to shard, no megatron import.
Any parallel layout (several processes under torchrun) is `ratpt.parallel.MegatronEngine`.
Both save the full model state dict (plain parameter names) and the AdamW moments by parameter
name, so a checkpoint of one layout resumes in any other.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ratpt.config import Config, ConfigError
from ratpt.ops.linear_cross_entropy import IGNORE_INDEX
from ratpt.parallel.data_parallel import DistributedContext
from ratpt.train.optim import parameter_groups


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
    with autocast_context(device, precision):
        if fused:
            return model(input_ids, labels=labels)
        logits = model(input_ids)
    return (compiled_cross_entropy_sum(compile_backend) if compile_backend else cross_entropy_sum)(logits, labels)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of logits [B, T, V] against labels [B, T] (IGNORE_INDEX skipped)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def compile_backend(cfg: Config) -> str | None:
    """The torch.compile backend of this run (train.compile_backend), or None when it is not compiled."""
    return cfg.train.compile_backend if cfg.train.compile else None


@functools.cache
def compiled_cross_entropy_sum(backend: str):
    """cross_entropy_sum through torch.compile: under inductor the fp32 upcast, log-softmax and their
    backward become passes over the bf16 logits, the largest tensors of a step, instead of fp32 copies."""
    return torch.compile(cross_entropy_sum, dynamic=False, backend=backend)


def labelled_tokens(micro_batches: Iterable[dict]) -> int:
    return int(sum((b["labels"] != IGNORE_INDEX).sum() for b in micro_batches))


class LocalEngine:
    """One process: the model as built, torch AdamW (decay on matrices only)."""

    dp_rank, dp_size = 0, 1

    def __init__(self, cfg: Config, ctx: DistributedContext, model: nn.Module) -> None:
        self.cfg, self.device = cfg, ctx.device
        self.model = model
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps, fused=ctx.device.type == "cuda")

    def forward_backward(self, micro_batches: list[dict]) -> tuple[float, float]:
        self.optimizer.zero_grad(set_to_none=True)
        total = max(1, labelled_tokens(micro_batches))
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro_batches:
            micro_loss = sum_cross_entropy(self.model, batch, self.device, self.cfg.train.precision,
                                           compile_backend(self.cfg), self.cfg.train.fused_loss) / total
            micro_loss.backward()
            loss_sum += micro_loss.detach()
        return loss_sum.item() * total, float(total)

    def clip_grad_norm(self, max_norm: float) -> float:
        return nn.utils.clip_grad_norm_(self.model.parameters(), max_norm if max_norm > 0 else float("inf")).item()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> tuple[float, float]:
        self.model.eval()
        loss, tokens = 0.0, 0.0
        for batch in batches:
            loss += sum_cross_entropy(self.model, batch, self.device, self.cfg.train.precision,
                                      fused=self.cfg.train.fused_loss).double().item()
            tokens += float((batch["labels"] != IGNORE_INDEX).sum())
        self.model.train()
        return loss, tokens

    def state_dict(self) -> dict:
        names = {param: name for name, param in self.model.named_parameters()}
        adam = {names[p]: {k: v.detach().clone() for k, v in s.items()} for p, s in self.optimizer.state.items()}
        return {"model": self.model.state_dict(), "optimizer": {"adam": adam}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for name, param in self.model.named_parameters():
            saved = state["optimizer"]["adam"].get(name)
            if saved is not None:
                fused = self.optimizer.defaults.get("fused")  # fused AdamW keeps its step on the device
                self.optimizer.state[param] = {
                    k: v.clone().to(param.device) if k != "step" or fused else v.clone().float().cpu()
                    for k, v in saved.items()}


def build_engine(cfg: Config, ctx: DistributedContext, model: nn.Module):
    """DeepSpeed ZeRO if `train.engine` says so; else LocalEngine for one process, megatron-core over the
    `parallel` layout for several."""
    if cfg.train.compile and (cfg.train.engine == "deepspeed" or ctx.world_size > 1):
        raise ConfigError("train.compile is supported for single-process training only (the megatron-core and "
                          "DeepSpeed engines would run the model uncompiled): set train.compile=false")
    if cfg.train.engine == "deepspeed":
        from ratpt.parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, ctx, model)
    if ctx.world_size == 1:
        return LocalEngine(cfg, ctx, model)
    from ratpt.parallel.megatron_engine import MegatronEngine

    return MegatronEngine(cfg, ctx, model)
