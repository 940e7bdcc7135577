"""What the trainer asks of an engine: the one interface every layout implements.

An engine owns this rank's model part, its optimizer and how both are saved. The trainer owns
the loop, the schedule, the data and when to checkpoint; it never looks inside an engine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class Engine(Protocol):
    dp_rank: int  # which sequences of each global batch this rank reads ...
    dp_size: int  # ... out of how many data-parallel replicas

    def forward_backward(self, micro_batches: list[dict]) -> tuple[float, float]:
        """Forward and backward over this rank's micro-batches of one step; gradients are those of the
        mean token loss of the global batch. Returns (sum of token losses, labelled tokens), global."""

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global gradient norm before clipping (non-finite if any gradient is); clip to `max_norm` (0: no)."""

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next `step`."""

    def step(self) -> None:
        """Apply the optimizer update to the gradients of the last `forward_backward`."""

    def evaluate(self, batches: Iterable[dict]) -> tuple[float, float]:
        """(sum of token losses, labelled tokens) over every rank's `batches`, without gradients."""

    def model_weights(self) -> dict[str, torch.Tensor]:
        """The whole plain model's weights by parameter name, as a checkpoint of this step holds them (the fp32
        masters under mixed precision), on rank 0 at least (collective): for evaluations that run a plain model
        (ratpt.train.downstream). Read them before the next `step`."""

    def save_checkpoint(self, directory: Path, step: int, train_state: dict[str, Any], config_yaml: str,
                        tokenizer_dir: Optional[Path], keep: int) -> Path:
        """Write checkpoint `step` under `directory` with `train_state` (step, data position, RNG, ...)
        beside the model and optimizer, atomically; keep the newest `keep` (collective). Returns its path,
        which may become visible only at a later `poll`/`wait` when the engine saves in the background."""

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Load model and optimizer from checkpoint directory `path` (written by any engine layout this
        engine can read); return the `train_state` saved with them (collective)."""

    def poll(self) -> None:
        """Publish a background save that every rank has finished (cheap; called every step)."""

    def wait(self) -> None:
        """Block until a background save is published."""
