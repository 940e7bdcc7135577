"""Learning-rate schedules as multipliers of the peak lr, so LambdaLR can hold (and checkpoint) them."""
import math

from ratpt.config import ScheduleConfig


class LRMultiplier:
    """Linear warmup from 0, then cosine or warmup-stable-decay to `min_lr_ratio`, or constant.

    A class rather than a closure so that LambdaLR's state_dict stays plain data.
    """

    def __init__(self, cfg: ScheduleConfig, total_steps: int) -> None:
        self.kind = cfg.kind
        self.total = total_steps
        self.warmup = round(cfg.warmup_fraction * total_steps)
        self.min_ratio = cfg.min_lr_ratio
        self.decay_start = total_steps - round(cfg.decay_fraction * total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
        elif step < self.decay_start:
            return 1.0
        else:
            progress = (step - self.decay_start) / max(1, self.total - self.decay_start)
        progress = min(progress, 1.0)
        if self.kind == "cosine":
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - (1 - self.min_ratio) * progress
