"""Stopping: SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) ask the loop to checkpoint at the end of the current step.

The handler only sets a flag; the loop decides when it is safe to stop, and all data-parallel
ranks agree (any rank signalled stops every rank) so that no collective is left waiting. A second
Ctrl-C is a person who will not wait for the step and the save: the run exits at once (status 130)
without a checkpoint; the last complete one stays.
"""
import logging
import signal
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGINT and self.requested:
            log.warning("interrupted again: exiting now, without a checkpoint of the current step")
            raise SystemExit(128 + signum)
        log.warning("received %s: checkpointing after this step, then stopping%s", signal.Signals(signum).name,
                    " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else "")
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
