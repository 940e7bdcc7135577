"""The training loop: build → restore → for each step: batches, forward/backward, clip, step, log,
maybe evaluate, maybe checkpoint.

The loss of a step is the mean over every labelled token of the global batch (all micro-batches
on all ranks), so accumulation and the parallel layout do not change it. How a step runs (one
process, or TP/PP/CP/DP through megatron-core) is the engine's business (ratpt.train.engine).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm import tqdm
from torch.utils.checkpoint import checkpoint

from ratpt.config import Config, data_parallel_size, to_yaml, validate_config
from ratpt.data import build_train_batches, build_val_batches
from ratpt.data.dataset import check_trained_tokenizer
from ratpt.model import build_model
from ratpt.model.flops import training_flops_per_token
from ratpt.parallel.data_parallel import DistributedContext, all_reduce_sum, init_distributed
from ratpt.parallel.dist_checkpoint import DistributedCheckpointer, is_distributed, load_distributed
from ratpt.train.checkpoint import (CONFIG_FILE, CheckpointError, checkpoint_step, latest_checkpoint,
                                   list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint)
from ratpt.train.engine import IGNORE_INDEX, LocalEngine, build_engine, sum_cross_entropy
from ratpt.train.metrics import MetricsLogger, device_peak_tflops
from ratpt.train.schedule import LRMultiplier
from ratpt.train.signals import StopRequest

log = logging.getLogger("ratpt.train")


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # the loss of every step this process ran (skipped steps included as nan)
    val_loss: Optional[float]
    checkpoint: Optional[Path]
    stopped_early: bool


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward; the instance attribute keeps parameter names unchanged."""
    for layer in model.layers:
        layer.forward = _checkpointed(layer.forward)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block with static shapes (after activation checkpointing, as torchtitan
    orders them): identical blocks share one compiled graph, so compiling costs one block, not all of
    them; the RAT kernels sit in the graph as opaque custom ops (kernels/autograd.py). The loss: the
    fused head + loss compiles its per-chunk softmax (model.loss_compile_backend); the unfused one
    (train.fused_loss=false) is compiled by the engine (engine.sum_cross_entropy)."""
    for layer in model.layers:
        layer.compile(dynamic=False, backend=backend)
    model.loss_compile_backend = backend


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def tokenizer_folder(cfg: Config) -> Optional[Path]:
    folder = Path(cfg.data.streams[0].path) / "tokenizer"
    return folder if folder.is_dir() else None


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, ctx: DistributedContext) -> float:
    """Mean validation loss per token of a plain model over `eval.max_samples` sequences, every
    process a data-parallel replica (`ratpt eval`)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for batch in _with_progress(_val_batches(cfg, ctx.rank, ctx.world_size), ctx.rank):
        totals[0] += sum_cross_entropy(model, batch, ctx.device, cfg.train.precision).double()
        totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
    all_reduce_sum(totals)
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


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
    stop = StopRequest()  # first: a stop signal during start-up (build, resume, data) is kept, not lost
    try:
        return _train(cfg, stop)
    finally:
        stop.restore()


def _train(cfg: Config, stop: StopRequest) -> TrainResult:
    ctx = init_distributed(cfg.train.device)
    validate_config(cfg, dp_size=data_parallel_size(cfg, ctx.world_size))
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    config_yaml = to_yaml(cfg)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config_yaml)

    # Build: the same plain model on every rank (same seed), then this rank's part of the layout.
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(ctx.device)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model, cfg.train.compile_backend)
    engine = build_engine(cfg, ctx, model)
    lr_multiplier = LRMultiplier(cfg.schedule, cfg.train.steps)
    step, bad_in_a_row, data_state = 0, 0, None

    resume_from = _resume_path(cfg, ckpt_dir)
    own_checkpoints = hasattr(engine, "save_checkpoint")  # DeepSpeed saves and loads through its own engine
    sharded = None if own_checkpoints else _distributed_checkpointer(cfg, engine)  # None: gathered checkpoints
    if resume_from is not None:
        check_same_model(cfg, resume_from)
        check_trained_tokenizer(str(resume_from), cfg.data.streams, cfg.model.vocab_size)
        if own_checkpoints:
            state = engine.load_checkpoint(resume_from)  # model and optimizer loaded; the rest returned
        else:
            state = _restore(engine, resume_from, ctx.device)
        _set_rng_state(state["rng"], ctx.device)
        step, bad_in_a_row, data_state = state["step"], state["bad_in_a_row"], state["data"]
        log.info("resumed from %s at step %d", resume_from, step)

    batches_source = build_train_batches(
        cfg.data, vocab_size=cfg.model.vocab_size, micro_batch=cfg.train.micro_batch,
        global_batch=cfg.train.global_batch, dp_rank=engine.dp_rank, dp_size=engine.dp_size,
    )
    accum = cfg.train.global_batch // (cfg.train.micro_batch * engine.dp_size)
    if data_state is not None:
        batches_source.load_state_dict(data_state)
    batches = iter(batches_source)
    # opened now, so that a validation set too small for one micro-batch per rank fails before training
    val_batches = _val_batches(cfg, engine.dp_rank, engine.dp_size) if cfg.eval.interval else None

    metrics = MetricsLogger(
        out_dir, cfg.train.steps, training_flops_per_token(cfg.model, cfg.data.seq_len),
        device_peak_tflops(ctx.device, cfg.logging.peak_tflops), ctx.world_size,
        cfg.logging.tensorboard, enabled=ctx.is_main,
    )
    metrics.log_config(config_yaml)
    losses: list[float] = []
    val_loss: Optional[float] = None
    last_checkpoint: Optional[Path] = None
    skipped = 0

    def save(at_step: int) -> Path:
        state = {
            "step": at_step,
            "data": batches_source.state_dict(),
            "rng": _rng_state(ctx.device),
            "bad_in_a_row": bad_in_a_row,
        }
        if own_checkpoints:
            return engine.save_checkpoint(ckpt_dir, at_step, state, config_yaml, tokenizer_folder(cfg),
                                          cfg.checkpoint.keep)
        if sharded is not None:  # every rank writes its own shards (in the background with async_save)
            return sharded.save(engine, ckpt_dir, at_step, state, config_yaml, tokenizer_folder(cfg),
                                cfg.checkpoint.keep)
        state.update(engine.state_dict())  # model and optimizer, gathered into one layout-independent form
        path = ckpt_dir / f"step_{at_step:08d}"
        if ctx.is_main:
            path = save_checkpoint(ckpt_dir, at_step, state, config_yaml, tokenizer_folder(cfg), cfg.checkpoint.keep)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return path

    log.info("training %s: %d steps from step %d, %d micro-batches of %d per data-parallel rank per step, "
             "%d process(es) on %s", cfg.name, cfg.train.steps, step, accum, cfg.train.micro_batch,
             ctx.world_size, ctx.device)
    stopped_early = False
    while step < cfg.train.steps:
        micro_batches = _step_batches(batches, accum)
        loss_sum, tokens = engine.forward_backward(micro_batches)  # the schedule: forward + backward
        loss = loss_sum / max(tokens, 1.0)
        grad_norm = engine.clip_grad_norm(cfg.optimizer.grad_clip)

        lr = cfg.optimizer.lr * lr_multiplier(step)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            engine.set_lr(lr)
            engine.step()
            bad_in_a_row = 0
        else:
            skipped += 1
            bad_in_a_row += 1
            log.warning("step %d: non-finite loss %s / grad norm %s; step skipped (%d in a row)",
                        step + 1, loss, grad_norm, bad_in_a_row)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                if sharded is not None:
                    sharded.wait()  # every rank diverges together: the save in flight still completes
                raise TrainingDiverged(
                    f"{bad_in_a_row} consecutive non-finite steps at step {step + 1}: lower optimizer.lr, "
                    f"check the data, or go back to an earlier checkpoint (checkpoint.resume=PATH, the newer "
                    f"ones moved out of {ckpt_dir})"
                )
        step += 1
        losses.append(loss)
        metrics.step(step, loss, int(tokens))

        if step % cfg.logging.interval == 0 or step == cfg.train.steps:
            metrics.flush(step, lr, grad_norm, skipped, ctx.device)
        if sharded is not None:
            sharded.poll()  # a background save that every rank has written becomes visible
        if stop.agreed(ctx.device) and step < cfg.train.steps:  # before evaluating: the time left goes to saving
            last_checkpoint = save(step)
            stopped_early = True
            break
        if cfg.eval.interval and (step % cfg.eval.interval == 0 or step == cfg.train.steps):
            val_sum, val_tokens = engine.evaluate(_with_progress(val_batches, engine.dp_rank))
            val_loss = val_sum / max(val_tokens, 1.0)
            metrics.scalars(step, {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50))})
            if ctx.is_main:
                log.info("step %d | val loss %.4f | val ppl %.2f", step, val_loss, math.exp(min(val_loss, 50)))
        if step == cfg.train.steps or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
            last_checkpoint = save(step)

    if sharded is not None:
        sharded.wait()  # the last checkpoint is complete when training returns
    metrics.close()
    return TrainResult(step, losses, val_loss, last_checkpoint, stopped_early)


def _distributed_checkpointer(cfg: Config, engine):
    """megatron's sharded writer for `checkpoint.format: distributed`, or None (gathered checkpoints):
    one process (LocalEngine) has nothing to shard and always writes the gathered form."""
    if cfg.checkpoint.format != "distributed":
        return None
    if isinstance(engine, LocalEngine):
        log.info("one process: checkpoints are written gathered (checkpoint.format=distributed needs several)")
        return None
    return DistributedCheckpointer(cfg.checkpoint.async_save)


def _restore(engine, path: Path, device: torch.device) -> dict:
    """Load a gathered or distributed checkpoint into `engine` (any layout); return its state.pt."""
    state = load_checkpoint(path, map_location=device)
    if is_distributed(state):
        load_distributed(engine, resolve_checkpoint(path), state)
    else:
        engine.load_state_dict(state)
    return state


# model keys a run may change when it resumes: the kernels' dispatch, and what only the initialisation reads
RESUMABLE_MODEL_CHANGES = frozenset({"kernels", "init_std"})


def check_same_model(cfg: Config, checkpoint: Path) -> None:
    """Refuse to resume the checkpoint directory `checkpoint` if it holds another model, naming the keys
    that differ (its weights would fail to load with a size mismatch, or, worse, load into a model they
    were not trained for)."""
    saved_yaml = checkpoint / CONFIG_FILE
    if not saved_yaml.is_file():
        return  # written before checkpoints carried their config: nothing to compare
    saved = OmegaConf.to_container(OmegaConf.load(saved_yaml)).get("model", {})
    current = OmegaConf.to_container(OmegaConf.structured(cfg).model)
    changed = [f"model.{key}: {saved.get(key)!r} there, {value!r} here" for key, value in current.items()
               if key not in RESUMABLE_MODEL_CHANGES and saved.get(key) != value]
    if changed:
        raise CheckpointError(f"{checkpoint} holds another model ({'; '.join(changed)}): resume with the model "
                              "it was trained with, or start a new run (another out_dir, or checkpoint.resume=never)")


def _resume_path(cfg: Config, ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint directory to resume from, or None."""
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        return latest_checkpoint(ckpt_dir)
    checkpoint = resolve_checkpoint(Path(cfg.checkpoint.resume))
    check_no_newer_checkpoints(checkpoint, cfg.checkpoint.resume, ckpt_dir)
    return checkpoint


def check_no_newer_checkpoints(checkpoint: Path, resume: str, ckpt_dir: Path) -> None:
    """Refuse an explicit resume (`resume`, resolved to the directory `checkpoint`) into a run folder
    that holds checkpoints newer than it (going back after a divergence, say): the run's checkpoints
    would interleave two histories, and a requeued job with the same arguments would go back again
    and lose what it trained since."""
    step = checkpoint_step(checkpoint)
    if step is None:
        return
    newer = [p.name for p in list_checkpoints(ckpt_dir) if checkpoint_step(p) > step]
    if newer:
        raise CheckpointError(
            f"checkpoint.resume={resume} is step {step}, but {ckpt_dir} holds newer checkpoints "
            f"({', '.join(newer)}): move those out of {ckpt_dir} (or write to another out_dir) to go back to "
            f"step {step}, or set checkpoint.resume=auto to continue from the newest")
