"""Preemption: SIGTERM / SIGUSR1 ask the loop to checkpoint at the end of the current step.

The handler only sets a flag; the loop decides when it is safe to stop, and all data-parallel
ranks agree (any rank signalled stops every rank) so that no collective is left waiting.
"""
import logging
import signal
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        log.warning("received %s: checkpointing after this step, then stopping", signal.Signals(signum).name)
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
