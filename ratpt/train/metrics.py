"""Training metrics: one console line per interval and the same scalars in TensorBoard.

MFU divides the model's own FLOP count (per layer type, ratpt.model.flops) by the device's
peak, so it stays honest for RAT, attention and hybrids alike.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("ratpt.train")

# Dense bf16 peak (TFLOP/s) by device-name fragment, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}
PEAK_FP8_TFLOPS = {"H200": 1978.9, "H100": 1978.9, "L40S": 733.0}  # dense FP8 (train.fp8's GEMMs); none on A100


def device_peak_tflops(device: torch.device, configured: float, fp8: bool = False) -> Optional[float]:
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in (PEAK_FP8_TFLOPS if fp8 else PEAK_BF16_TFLOPS).items() if key in name), None)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class MetricsLogger:
    """Accumulates per-step numbers between log points; rank 0 prints and writes TensorBoard."""

    def __init__(
        self,
        out_dir: Path,
        total_steps: int,
        flops_per_token: float,
        peak_tflops: Optional[float],
        n_devices: int,
        tensorboard: bool,
        enabled: bool,
    ) -> None:
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_tflops * 1e12 * n_devices if peak_tflops else None
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._since = now
        self._tokens = 0
        self._losses: list[float] = []

    def log_config(self, config_yaml: str, step: int, note: Optional[str] = None) -> None:
        """The config of the run starting (or resuming) at `step` as TensorBoard text, after `note` (e.g.
        that a resume changed the LR schedule)."""
        if self.writer is not None:
            self.writer.add_text("config", (f"{note}\n\n" if note else "") + f"```\n{config_yaml}\n```", step)

    def step(self, step: int, loss: float, tokens: int) -> None:
        self._tokens += tokens
        self._losses.append(loss)

    def flush(self, step: int, lr: float, grad_norm: float, skipped: int, device: torch.device) -> None:
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        tokens_per_s = self._tokens / elapsed
        steps_per_s = len(self._losses) / elapsed
        loss = sum(self._losses) / max(1, len(self._losses))
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": tokens_per_s,
            "train/skipped_steps": skipped,
            "train/memory_gib": memory_gib(device),
        }
        mfu = ""
        if self.peak_flops:
            scalars["train/mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
            mfu = f" | mfu {100 * scalars['train/mfu']:.1f}%"
        eta = _format_eta((self.total_steps - step) / steps_per_s) if steps_per_s > 0 else "?"
        if self.enabled:
            log.info(
                "step %d/%d | loss %.4f | lr %.3e | grad %.3f | %.0f tok/s%s | mem %.1f GiB | eta %s",
                step, self.total_steps, loss, lr, grad_norm, tokens_per_s, mfu,
                scalars["train/memory_gib"], eta,
            )
            self.scalars(step, scalars)
        self._reset(now)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
