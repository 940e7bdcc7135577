"""The training loop: build → restore → for each step: batches, forward/backward, clip, step, log,
maybe evaluate, maybe checkpoint.

The loss of a step is the mean over every labelled token of the global batch (all micro-batches
on all ranks), so accumulation and the parallel layout do not change it. How a step runs (one
process, megatron-core's layouts, DeepSpeed) is the engine's business (ratpt.engines).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from tqdm import tqdm

from ratpt.config import Config, data_parallel_size, micro_batches_per_step, to_yaml, validate_config
from ratpt.data import build_train_batches, build_val_batches
from ratpt.engines import build_engine
from ratpt.engines.loss import IGNORE_INDEX, sum_cross_entropy
from ratpt.errors import TrainingDiverged
from ratpt.model import build_model
from ratpt.model.flops import training_flops_per_token
from ratpt.parallel.mesh import leave_distributed
from ratpt.parallel.process_group import (DistributedContext, all_reduce_sum, init_distributed,
                                          naming_collective_timeouts)
from ratpt.train.checkpointer import Checkpointer, initial_weights, resume_path, schedule_change
from ratpt.train.downstream import DownstreamEval, downstream_enabled
from ratpt.train.metrics import MetricsLogger, device_peak_tflops
from ratpt.train.run_lock import hold_run_folder
from ratpt.train.schedule import LRMultiplier
from ratpt.train.signals import StopRequest

log = logging.getLogger("ratpt.train")


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # the loss of every step this process ran (skipped steps included as nan)
    val_loss: Optional[float]
    checkpoint: Optional[Path]
    stopped_early: bool


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, ctx: DistributedContext) -> tuple[float, int]:
    """Mean validation loss per token of a plain model, every process a data-parallel replica (`ratpt eval`),
    and the sequences it covered: up to `eval.max_samples`, fewer where the split holds fewer, in whole
    micro-batches on every rank."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, tokens, sequences
    for batch in _with_progress(_val_batches(cfg, ctx.rank, ctx.world_size), ctx.rank):
        totals[0] += sum_cross_entropy(model, batch, ctx.device, cfg.train.precision).double()
        totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
        totals[2] += batch["labels"].shape[0]
    all_reduce_sum(totals)
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[2])


def _val_batches(cfg: Config, dp_rank: int, dp_size: int):
    """The validation micro-batches of this rank (re-iterable: the same samples every pass)."""
    return build_val_batches(cfg.data, vocab_size=cfg.model.vocab_size, micro_batch=cfg.train.micro_batch,
                             dp_rank=dp_rank, dp_size=dp_size, max_samples=cfg.eval.max_samples)


def _with_progress(batches, dp_rank: int):
    """One validation pass with a progress bar on rank 0 (a person waits)."""
    return tqdm(batches, desc="validation", unit="batch", leave=False, disable=dp_rank != 0)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    # NOTE: .cpu(): a checkpoint loaded onto the GPU (map_location) holds the states there; torch wants CPU bytes
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _step_batches(batches: Iterator[dict], n: int) -> list[dict]:
    step = [next(batches, None) for _ in range(n)]
    if any(b is None for b in step):
        raise RuntimeError("the training data ran out mid-step; the data loader should cycle epochs")
    return step


def train(cfg: Config) -> TrainResult:
    """Train `cfg` in its out_dir, which this run holds alone (ratpt.train.run_lock) from before its first
    write to its end."""
    stop = StopRequest()  # first: a stop signal during start-up (build, resume, data) is kept, not lost
    try:
        ctx = init_distributed(cfg.train.device)
        with hold_run_folder(Path(cfg.out_dir)), naming_collective_timeouts():
            result = Trainer(cfg, ctx, stop).train()
            leave_distributed()
        return result
    finally:
        stop.restore()


class Trainer:
    """One run: built and restored in `__init__`, trained by `train`, one `train_step` at a time."""

    def __init__(self, cfg: Config, ctx: DistributedContext, stop: StopRequest) -> None:
        self.cfg, self.ctx, self.stop = cfg, ctx, stop
        dp_size = data_parallel_size(cfg, ctx.world_size)
        validate_config(cfg, dp_size=dp_size)
        # checked first: lm-eval, its tasks and the tokenizer (eval.tasks, eval.passkey)
        self.downstream = DownstreamEval(cfg, ctx.device) if downstream_enabled(cfg) else None
        self.micro_batches = micro_batches_per_step(cfg.train, dp_size)
        out_dir = Path(cfg.out_dir)
        self.config_yaml = config_yaml = to_yaml(cfg)

        # Build: the same plain model on every rank (same seed; or the weights of checkpoint.init_from when
        # this run has no checkpoint of its own), then this rank's part of the layout.
        resume_from = resume_path(cfg, ctx.world_size)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model).to(ctx.device)
        if resume_from is None and cfg.checkpoint.init_from:
            model.load_state_dict(initial_weights(cfg))
        self.engine = build_engine(cfg, ctx, model)
        self.checkpointer = Checkpointer(cfg, self.engine, config_yaml)
        self.lr_multiplier = LRMultiplier(cfg.schedule, cfg.train.steps)
        self.step, self.bad_in_a_row, self.skipped = 0, 0, 0

        # Restore: model, optimizer, RNG, the step and the data position.
        state = self.checkpointer.load(resume_from) if resume_from is not None else None
        schedule_note = None
        if state is not None:
            _set_rng_state(state["rng"], ctx.device)
            self.step, self.bad_in_a_row = state["step"], state["bad_in_a_row"]
            schedule_note = schedule_change(cfg, resume_from, self.step)
            if schedule_note and ctx.is_main:
                log.warning(schedule_note)
        self.data = build_train_batches(
            cfg.data, vocab_size=cfg.model.vocab_size, micro_batch=cfg.train.micro_batch,
            global_batch=cfg.train.global_batch, dp_rank=self.engine.dp_rank, dp_size=self.engine.dp_size,
        )
        if state is not None:
            self.data.load_state_dict(state["data"])
        self.batches = iter(self.data)
        # opened now, so that a validation set too small for one micro-batch per rank fails before training
        self.val_batches = _val_batches(cfg, self.engine.dp_rank, self.engine.dp_size) if cfg.eval.interval else None

        self.metrics = MetricsLogger(
            out_dir, cfg.train.steps, training_flops_per_token(cfg.model, cfg.data.seq_len),
            device_peak_tflops(ctx.device, cfg.logging.peak_tflops), ctx.world_size,
            cfg.logging.tensorboard, enabled=ctx.is_main,
        )
        self.metrics.log_config(config_yaml, self.step, schedule_note)

    def train(self) -> TrainResult:
        cfg = self.cfg
        if self.step >= cfg.train.steps:  # a finished run started again (a requeued job, a repeated command)
            log.info("%s is at step %d, train.steps is %d: nothing to train (raise train.steps to go on)",
                     cfg.out_dir, self.step, cfg.train.steps)
            self.metrics.close()
            return TrainResult(self.step, [], None, None, False)
        if self.ctx.is_main:  # only now, built and restored: a run refused at start-up leaves the last one's
            (Path(cfg.out_dir) / "config.yaml").write_text(self.config_yaml)
        log.info("training %s: %d steps from step %d, %d micro-batches of %d per data-parallel rank per step, "
                 "%d process(es) on %s", cfg.name, cfg.train.steps, self.step, self.micro_batches,
                 cfg.train.micro_batch, self.ctx.world_size, self.ctx.device)
        losses: list[float] = []
        val_loss: Optional[float] = None
        last_checkpoint: Optional[Path] = None
        stopped_early = False
        while self.step < cfg.train.steps:
            losses.append(self.train_step())
            final = self.step == cfg.train.steps
            self.checkpointer.poll()  # a background save that every rank has written becomes visible
            if self.stop.agreed(self.ctx.device) and not final:  # before evaluating: the time left goes to saving
                last_checkpoint = self.save()
                stopped_early = True
                break
            if cfg.eval.interval and (self.step % cfg.eval.interval == 0 or final):
                val_loss = self.evaluate()
            if final or (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                last_checkpoint = self.save()
        self.checkpointer.wait()  # the last checkpoint is complete when training returns
        self.metrics.close()
        return TrainResult(self.step, losses, val_loss, last_checkpoint, stopped_early)

    def train_step(self) -> float:
        """One optimizer step over the next global batch; a step with a non-finite loss or gradient
        norm is skipped (weights and optimizer state untouched). Returns the step's loss."""
        cfg = self.cfg
        loss_sum, tokens = self.engine.forward_backward(_step_batches(self.batches, self.micro_batches))
        loss = loss_sum / max(tokens, 1.0)
        grad_norm = self.engine.clip_grad_norm(cfg.optimizer.grad_clip)
        lr = cfg.optimizer.lr * self.lr_multiplier(self.step)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.engine.set_lr(lr)
            self.engine.step()
            self.bad_in_a_row = 0
        else:
            self.skip(loss, grad_norm)
        self.step += 1
        self.metrics.step(self.step, loss, int(tokens))
        if self.step % cfg.logging.interval == 0 or self.step == cfg.train.steps:
            self.metrics.flush(self.step, lr, grad_norm, self.skipped, self.ctx.device)
        return loss

    def skip(self, loss: float, grad_norm: float) -> None:
        self.skipped += 1
        self.bad_in_a_row += 1
        log.warning("step %d: non-finite loss %s / grad norm %s; step skipped (%d in a row)",
                    self.step + 1, loss, grad_norm, self.bad_in_a_row)
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            self.checkpointer.wait()  # every rank diverges together: the save in flight still completes
            raise TrainingDiverged(
                f"{self.bad_in_a_row} consecutive non-finite steps at step {self.step + 1}: lower optimizer.lr, "
                f"check the data, or go back to an earlier checkpoint (checkpoint.resume=PATH, the newer "
                f"ones moved out of {self.checkpointer.directory})"
            )

    def evaluate(self) -> float:
        """Validation loss and perplexity, then the lm-eval tasks and passkey retrieval asked for (eval.*)."""
        val_sum, val_tokens = self.engine.evaluate(_with_progress(self.val_batches, self.engine.dp_rank))
        val_loss = val_sum / max(val_tokens, 1.0)
        perplexity = math.exp(min(val_loss, 50))
        self.metrics.scalars(self.step, {"val/loss": val_loss, "val/perplexity": perplexity})
        if self.ctx.is_main:
            log.info("step %d | val loss %.4f | val ppl %.2f", self.step, val_loss, perplexity)
        if self.downstream is not None:
            self.metrics.scalars(self.step, self.downstream(self.engine, self.step))
        return val_loss

    def save(self) -> Path:
        return self.checkpointer.save(self.step, self.train_state())

    def train_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides model and optimizer: enough to continue exactly."""
        return {"step": self.step, "data": self.data.state_dict(), "rng": _rng_state(self.ctx.device),
                "bad_in_a_row": self.bad_in_a_row}
