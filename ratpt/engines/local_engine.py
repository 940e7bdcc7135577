"""One process, plain PyTorch: the model as built and torch AdamW (decay on matrices only).

It saves the gathered checkpoint form (full model state dict, AdamW moments by plain parameter
name) that every layout reads, and reads a distributed checkpoint of any layout whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ratpt.checkpoint import load_checkpoint, resolve_checkpoint, save_gathered
from ratpt.config import Config
from ratpt.engines.loss import IGNORE_INDEX, labelled_tokens, sum_cross_entropy
from ratpt.engines.megatron_checkpoint import is_distributed, read_plain_state
from ratpt.engines.optim import parameter_groups
from ratpt.parallel.process_group import DistributedContext


class LocalEngine:
    """The engine of a single process without a process group (see ratpt.engines.contract)."""

    dp_rank, dp_size = 0, 1

    def __init__(self, cfg: Config, ctx: DistributedContext, model: nn.Module,
                 compile_backend: Optional[str] = None) -> None:
        self.cfg, self.device = cfg, ctx.device
        self.model = model
        self.compile_backend = compile_backend
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps, fused=ctx.device.type == "cuda")

    def forward_backward(self, micro_batches: list[dict]) -> tuple[float, float]:
        self.optimizer.zero_grad(set_to_none=True)
        total = max(1, labelled_tokens(micro_batches))
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro_batches:
            micro_loss = sum_cross_entropy(self.model, batch, self.device, self.cfg.train.precision,
                                           self.compile_backend, self.cfg.train.fused_loss) / total
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

    def model_weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    # ----- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, directory: Path, step: int, train_state: dict[str, Any], config_yaml: str,
                        tokenizer_dir: Optional[Path], keep: int) -> Path:
        return save_gathered(directory, step, {**train_state, **self.state_dict()}, config_yaml, tokenizer_dir, keep)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        state = load_checkpoint(path, map_location=self.device)
        if is_distributed(state):  # every rank's shards of a parallel run: read whole here
            state.update(read_plain_state(resolve_checkpoint(path)))
        self.load_state_dict(state)
        return state

    def poll(self) -> None:
        """Saves are synchronous: nothing in flight."""

    def wait(self) -> None:
        """Saves are synchronous: nothing in flight."""

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
