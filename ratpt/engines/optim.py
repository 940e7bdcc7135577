"""AdamW with the paper's defaults, decay on matrices only, and its lr schedule."""
import torch
from torch import nn

from ratpt.config import OptimizerConfig, ScheduleConfig
from ratpt.train.schedule import LRMultiplier


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear weights, the tied embedding) decay; norms, gate biases and other vectors don't."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, schedule: ScheduleConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    on_cuda = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=on_cuda,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRMultiplier(schedule, total_steps))
    return optimizer, scheduler
