"""One run per out_dir at a time.

Two runs writing one out_dir would delete each other's checkpoints in the making, publish empty ones
and interleave their TensorBoard events. Rank 0 holds the folder (ratpt.folder_lock: a flock that dies
with its holder, so a crashed run's lock is simply taken over) from before anything is written until
the run ends; the other ranks learn its outcome, so a refused run fails on every rank at once, naming
the holder. Holding the folder is also what makes the trainer's clean-up of stale `*.tmp` checkpoint
directories safe: no other writer can own one.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from ratpt.folder_lock import hold_folder
from ratpt.parallel.process_group import on_rank0


@contextmanager
def hold_run_folder(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir` for the block (rank 0; collective), else raise FolderLocked on every rank."""
    with ExitStack() as held:
        on_rank0(lambda: held.enter_context(hold_folder(out_dir, purpose="training")))
        yield
