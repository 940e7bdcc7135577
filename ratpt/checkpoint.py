"""Training checkpoints on disk: atomic directories, newest-complete discovery, safe loading.

A checkpoint is a directory `step_XXXXXXXX/` holding `state.pt` (model, optimizer, scheduler,
data-loader position, RNG states, step), `config.yaml` (the resolved run config) and a copy of
the tokenizer folder, so that it alone is enough to resume, evaluate, export or generate.
It is written under a temporary name and renamed into place: a crash mid-save leaves at most a
`*.tmp` directory, which discovery ignores and the next save removes, and the previous
checkpoint stays loadable. Loading uses `torch.load(weights_only=True)`: no arbitrary pickle.
Every engine writes this layout (ratpt.engines); a distributed checkpoint keeps the model and
optimizer in every rank's shard files under `dist/` (ratpt.engines.megatron_checkpoint) and its
`state.pt` holds the rest (step, data position, RNG).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from ratpt.files import publish_dir

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the path."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first (temporary directories excluded)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(directory: Path) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def temporary_dir(directory: Path, step: int) -> Path:
    """Where checkpoint `step` is assembled before it is renamed into place."""
    return directory / f"{checkpoint_name(step)}.tmp"


def start_checkpoint(directory: Path, step: int) -> Path:
    """Create the temporary directory of checkpoint `step`, removing any an interrupted save left."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temporary_dir(directory, step)
    tmp.mkdir()
    return tmp


def finish_checkpoint(
    tmp: Path, state: dict[str, Any], config_yaml: str, tokenizer_dir: Optional[Path], keep: Optional[int]
) -> Path:
    """Add state, config and tokenizer to `tmp`, flush it to disk, rename it into place, and delete
    the oldest others until `keep` remain; the one just written is never among them, even when older
    steps were resumed from and newer ones lie beside it. keep None deletes nothing."""
    torch.save(state, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(config_yaml)
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    publish_dir(tmp, final)  # a same-step checkpoint is replaced whole
    if keep is not None:
        others = [p for p in list_checkpoints(final.parent) if p != final]
        for old in others[:max(len(others) - keep + 1, 0)]:
            shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def checkpoint_step(path: Path) -> Optional[int]:
    """The step in a `step_XXXXXXXX` directory's name, or None for a directory named otherwise."""
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def save_checkpoint(
    directory: Path,
    step: int,
    state: dict[str, Any],
    config_yaml: str,
    tokenizer_dir: Optional[Path],
    keep: Optional[int],
) -> Path:
    """Write checkpoint `step` atomically, then delete the oldest others until `keep` remain (None: none)."""
    return finish_checkpoint(start_checkpoint(directory, step), state, config_yaml, tokenizer_dir, keep)


def save_gathered(directory: Path, step: int, state: dict[str, Any], config_yaml: str, tokenizer_dir: Optional[Path],
                  keep: Optional[int]) -> Path:
    """Write the gathered `state` (model, optimizer, train state: the same on every rank) as checkpoint
    `step` from rank 0; every rank returns once it is in place (collective under a process group)."""
    path = directory / checkpoint_name(step)
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = save_checkpoint(directory, step, state, config_yaml, tokenizer_dir, keep)
    if dist.is_initialized():
        dist.barrier()
    return path


@contextlib.contextmanager
def weights_only_loads(allowed: Iterable[type] = ()) -> Iterator[None]:
    """Every torch.load inside, third-party ones that ask for weights_only=False included (DeepSpeed's
    checkpoint loaders), unpickles only tensors, plain containers and the data-only `allowed` classes:
    torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD, set for the duration."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint directory, its state file, or a folder of checkpoints (newest wins)."""
    if path.is_file() and path.name == STATE_FILE:
        return path.parent
    if (path / STATE_FILE).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        newest = latest_checkpoint(candidate)
        if newest is not None:
            return newest
    raise CheckpointError(
        f"no complete checkpoint at {path}: expected a step_XXXXXXXX directory holding {STATE_FILE}, "
        "or a run/checkpoints folder containing one"
    )


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load `state.pt` without executing pickled code."""
    checkpoint = resolve_checkpoint(path)
    try:
        return torch.load(checkpoint / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file: name it rather than dump a traceback
        older = [p for p in list_checkpoints(checkpoint.parent) if p.name < checkpoint.name]
        fallback = (f"; the checkpoint before it, {older[-1]}, can be resumed with checkpoint.resume={older[-1]}"
                    if older else "")
        raise CheckpointError(f"cannot read {checkpoint / STATE_FILE} (corrupt, truncated, or not a ratpt "
                              f"checkpoint: {' '.join(str(err).split())[:300]}){fallback}") from err
