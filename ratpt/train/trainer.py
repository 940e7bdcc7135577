"""The training loop: build → restore → for each step: batches, forward/backward, clip, step, log,
maybe evaluate, maybe checkpoint.

The loss of a step is the mean over every labelled token of the global batch (all micro-batches
on all ranks), so accumulation and the number of data-parallel ranks do not change it.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ratpt.config import Config, to_yaml, validate_config
from ratpt.data import build_train_batches, build_val_batches
from ratpt.model import build_model
from ratpt.model.flops import training_flops_per_token
from ratpt.parallel.data_parallel import DistributedContext, all_reduce_sum, init_distributed, wrap_data_parallel
from ratpt.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ratpt.train.metrics import MetricsLogger, device_peak_tflops
from ratpt.train.optim import build_optimizer
from ratpt.train.signals import StopRequest

log = logging.getLogger("ratpt.train")

IGNORE_INDEX = -100


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # the loss of every step this process ran (skipped steps included as nan)
    val_loss: Optional[float]
    checkpoint: Optional[Path]
    stopped_early: bool


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast over fp32 master weights on CUDA; plain fp32 elsewhere unless asked."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward; the instance attribute keeps parameter names unchanged."""
    for layer in model.layers:
        layer.forward = _checkpointed(layer.forward)


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def tokenizer_folder(cfg: Config) -> Optional[Path]:
    folder = Path(cfg.data.streams[0].path) / "tokenizer"
    return folder if folder.is_dir() else None


def sum_cross_entropy(model: nn.Module, batch: dict[str, torch.Tensor], ctx: DistributedContext,
                      precision: str) -> torch.Tensor:
    input_ids = batch["input_ids"].to(ctx.device, non_blocking=True)
    labels = batch["labels"].to(ctx.device, non_blocking=True)
    with autocast_context(ctx.device, precision):
        logits = model(input_ids)
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, ctx: DistributedContext) -> float:
    """Mean validation loss per token over `eval.max_samples` sequences (all ranks together)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    batches = build_val_batches(
        cfg.data, vocab_size=cfg.model.vocab_size, micro_batch=cfg.train.micro_batch,
        dp_rank=ctx.rank, dp_size=ctx.world_size, max_samples=cfg.eval.max_samples,
    )
    for batch in batches:
        totals[0] += sum_cross_entropy(model, batch, ctx, cfg.train.precision).double()
        totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
    all_reduce_sum(totals)
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _step_batches(batches: Iterator[dict], n: int) -> list[dict]:
    step = [next(batches, None) for _ in range(n)]
    if any(b is None for b in step):
        raise RuntimeError("the training data ran out mid-step; the data loader should cycle epochs")
    return step


def train(cfg: Config) -> TrainResult:
    ctx = init_distributed(cfg.train.device)
    validate_config(cfg, dp_size=ctx.world_size)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    config_yaml = to_yaml(cfg)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config_yaml)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(ctx.device)
    optimizer, scheduler = build_optimizer(model, cfg.optimizer, cfg.schedule, cfg.train.steps)
    step, bad_in_a_row, data_state = 0, 0, None

    resume_from = _resume_path(cfg, ckpt_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=ctx.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], ctx.device)
        step, bad_in_a_row, data_state = state["step"], state["bad_in_a_row"], state["data"]
        log.info("resumed from %s at step %d", resume_from, step)

    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    runnable = torch.compile(model) if cfg.train.compile else model
    runnable = wrap_data_parallel(runnable, ctx)

    accum = cfg.train.global_batch // (cfg.train.micro_batch * ctx.world_size)
    batches_source = build_train_batches(
        cfg.data, vocab_size=cfg.model.vocab_size, micro_batch=cfg.train.micro_batch,
        global_batch=cfg.train.global_batch, dp_rank=ctx.rank, dp_size=ctx.world_size,
    )
    if data_state is not None:
        batches_source.load_state_dict(data_state)
    batches = iter(batches_source)

    metrics = MetricsLogger(
        out_dir, cfg.train.steps, training_flops_per_token(cfg.model, cfg.data.seq_len),
        device_peak_tflops(ctx.device, cfg.logging.peak_tflops), ctx.world_size,
        cfg.logging.tensorboard, enabled=ctx.is_main,
    )
    metrics.log_config(config_yaml)
    stop = StopRequest()
    losses: list[float] = []
    val_loss: Optional[float] = None
    last_checkpoint: Optional[Path] = None
    skipped = 0

    def save(at_step: int) -> Path:
        state = {
            "step": at_step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": batches_source.state_dict(),
            "rng": _rng_state(ctx.device),
            "bad_in_a_row": bad_in_a_row,
        }
        path = ckpt_dir / f"step_{at_step:08d}"
        if ctx.is_main:
            path = save_checkpoint(ckpt_dir, at_step, state, config_yaml, tokenizer_folder(cfg), cfg.checkpoint.keep)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return path

    log.info("training %s: %d steps from step %d, %d micro-batches of %d per rank per step, %d rank(s) on %s",
             cfg.name, cfg.train.steps, step, accum, cfg.train.micro_batch, ctx.world_size, ctx.device)
    model.train()
    stopped_early = False
    while step < cfg.train.steps:
        micro_batches = _step_batches(batches, accum)
        label_count = torch.tensor(
            float(sum((b["labels"] != IGNORE_INDEX).sum() for b in micro_batches)), device=ctx.device
        )
        total_tokens = all_reduce_sum(label_count).clamp(min=1)
        loss_sum = torch.zeros((), device=ctx.device)
        for i, batch in enumerate(micro_batches):
            sync = i == accum - 1 or ctx.world_size == 1
            with contextlib.nullcontext() if sync else runnable.no_sync():
                micro_loss = sum_cross_entropy(runnable, batch, ctx, cfg.train.precision) / total_tokens
                # DDP averages gradients over ranks; the loss is already a global mean, so undo that.
                (micro_loss * ctx.world_size).backward()
            loss_sum += micro_loss.detach()
        loss = all_reduce_sum(loss_sum).item()
        clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip).item()

        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
            bad_in_a_row = 0
        else:
            skipped += 1
            bad_in_a_row += 1
            log.warning("step %d: non-finite loss %s / grad norm %s; step skipped (%d in a row)",
                        step + 1, loss, grad_norm, bad_in_a_row)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise TrainingDiverged(
                    f"{bad_in_a_row} consecutive non-finite steps at step {step + 1}: lower optimizer.lr, "
                    f"check the data, or resume from an earlier checkpoint in {ckpt_dir}"
                )
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        losses.append(loss)
        metrics.step(step, loss, int(total_tokens.item()))

        if step % cfg.logging.interval == 0 or step == cfg.train.steps:
            metrics.flush(step, scheduler.get_last_lr()[0], grad_norm, skipped, ctx.device)
        if cfg.eval.interval and (step % cfg.eval.interval == 0 or step == cfg.train.steps):
            val_loss = evaluate(runnable, cfg, ctx)
            metrics.scalars(step, {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50))})
            if ctx.is_main:
                log.info("step %d | val loss %.4f | val ppl %.2f", step, val_loss, math.exp(min(val_loss, 50)))
        if stop.agreed(ctx.device):
            last_checkpoint = save(step)
            stopped_early = step < cfg.train.steps
            break
        if step == cfg.train.steps or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
            last_checkpoint = save(step)

    stop.restore()
    metrics.close()
    return TrainResult(step, losses, val_loss, last_checkpoint, stopped_early)


def _resume_path(cfg: Config, ckpt_dir: Path) -> Optional[Path]:
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        return latest_checkpoint(ckpt_dir)
    return Path(cfg.checkpoint.resume)
