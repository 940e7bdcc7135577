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

Every file of a checkpoint, every rank's shards included, is listed with its size and hash in
`checksums.json` (ratpt.files), written last before the rename; `verify_checkpoint` checks them
when a checkpoint is resumed, evaluated, exported or consolidated, and names the checkpoint to fall
back to. A save that fails (disk full) removes its temporary directory and says what failed where.
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

from ratpt.files import CHECKSUMS, checksum_mismatch, file_checksum, publish_dir, write_checksums
from ratpt.model.pretrained import WEIGHTS
from ratpt.parallel.process_group import on_rank0

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
BROKEN = ".broken"  # suffix of a checkpoint moved aside as provably broken (discovery ignores it)
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
    """Create the temporary directory of checkpoint `step`, removing any an interrupted save left.
    The caller holds `directory` alone (the trainer holds its out_dir: ratpt.train.run_lock), so every
    `*.tmp` there is a dead save's, never a running one's."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temporary_dir(directory, step)
    tmp.mkdir()
    return tmp


def finish_checkpoint(tmp: Path, state: dict[str, Any], config_yaml: str, tokenizer_dir: Optional[Path],
                      keep: Optional[int], checksums: Optional[dict[str, dict[str, Any]]] = None) -> Path:
    """Add state, config and tokenizer to `tmp`, then its checksums (of every file; `checksums` holds those
    of files other ranks hashed already), flush it to disk, rename it into place, and delete the oldest
    others until `keep` remain; the one just written is never among them, even when older steps were
    resumed from and newer ones lie beside it. keep None deletes nothing. A failed write (disk full, a
    file size limit) removes `tmp` and raises CheckpointError naming the file; older checkpoints stay."""
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    target = tmp / STATE_FILE  # what is being written, for the message of a failed write
    try:
        with open(target, "wb") as handle:  # a file object: a failed write raises OSError with its errno
            torch.save(state, handle)
        target = tmp / CONFIG_FILE
        target.write_text(config_yaml)
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            target = tmp / TOKENIZER_DIR
            shutil.copytree(tokenizer_dir, target)
        target = tmp / CHECKSUMS
        write_checksums(tmp, checksums)
        target = final
        publish_dir(tmp, final)  # a same-step checkpoint is replaced whole
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(final.parent)
        # torch.save wraps the OSError of a failed write (errno: disk full, file too large) in its own
        os_error = err if isinstance(err, OSError) else err.__context__
        cause = os_error.strerror if isinstance(os_error, OSError) and os_error.strerror else _short(err)
        raise CheckpointError(
            f"saving checkpoint {final.name} failed writing {getattr(err, 'filename', None) or target}: "
            f"{cause}. Its partial folder {tmp} was removed; "
            + (f"the newest checkpoint, {kept}, is kept" if kept else "no earlier checkpoint exists")
            + ". Free space there (or lower checkpoint.keep) and run the same command again") from err
    if keep is not None:
        others = [p for p in list_checkpoints(final.parent) if p != final]
        for old in others[:max(len(others) - keep + 1, 0)]:
            shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def checksums_by_rank(tmp: Path) -> dict[str, dict[str, Any]]:
    """The checksums of the files every rank wrote under `tmp`, hashed in parallel (collective): each
    rank hashes every world-th file, largest first, while they are fresh in the page cache; rank 0
    gets them all (for finish_checkpoint), the other ranks {}. Splitting the folder rather than having
    each rank find its own files works for any writer's naming (DCP's, DeepSpeed's)."""
    dist.barrier()  # every rank's files are complete
    rank, world = dist.get_rank(), dist.get_world_size()
    files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (-p.stat().st_size, p.name))
    mine = {p.relative_to(tmp).as_posix(): file_checksum(p) for p in files[rank::world]}
    parts: Optional[list] = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {name: entry for part in parts for name, entry in part.items()} if parts else {}


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
    `step` from rank 0; every rank returns once it is in place, or raises rank 0's error (collective)."""
    return on_rank0(lambda: save_checkpoint(directory, step, state, config_yaml, tokenizer_dir, keep))


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
    exported = (f"; {path} is an exported model folder ({WEIGHTS}): this command takes the training run "
                "or checkpoint it was exported from" if (path / WEIGHTS).is_file() else "")
    raise CheckpointError(
        f"no complete checkpoint at {path}: expected a step_XXXXXXXX directory holding {STATE_FILE}, "
        f"or a run/checkpoints folder containing one{exported}"
    )


def verify_checkpoint(path: Path) -> Path:
    """The checkpoint directory at `path` (resolve_checkpoint), after checking every file against its
    checksums.json; CheckpointError naming the broken file and the checkpoint to fall back to."""
    checkpoint = resolve_checkpoint(path)
    broken = checksum_mismatch(checkpoint)
    if broken is not None:
        raise CheckpointError(f"checkpoint {checkpoint} is broken: {broken}; {fallback_advice(checkpoint)}")
    return checkpoint


def fallback_advice(checkpoint: Path) -> str:
    """What to run instead of a broken `checkpoint`: the one before it, by path or through resume=auto."""
    older = [p for p in list_checkpoints(checkpoint.parent) if p.name < checkpoint.name]
    if not older:
        return "no earlier checkpoint lies beside it: start afresh (checkpoint.resume=never, or another out_dir)"
    return (f"the one before it is {older[-1]}: evaluate or export that path, or to resume from it run the "
            f"same `ratpt train` command (checkpoint.resume=auto moves a checkpoint whose checksums fail aside "
            f"by itself; one without checksums.json by `mv {checkpoint} {checkpoint}{BROKEN}`)")


def set_aside(checkpoint: Path) -> Path:
    """Rename a broken checkpoint to `step_N.broken` (the first free such name), out of discovery's way
    but kept for inspection."""
    aside = checkpoint.with_name(checkpoint.name + BROKEN)
    n = 1
    while aside.exists():
        n += 1
        aside = checkpoint.with_name(f"{checkpoint.name}{BROKEN}{n}")
    os.replace(checkpoint, aside)
    return aside


def _short(err: BaseException, limit: int = 300) -> str:
    """An error's message on one line, cut at a word boundary."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load `state.pt` without executing pickled code; `mmap`: tensors are read from the file when touched."""
    checkpoint = resolve_checkpoint(path)
    try:
        return torch.load(checkpoint / STATE_FILE, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # a truncated or foreign file: name it rather than dump a traceback
        raise CheckpointError(f"cannot read {checkpoint / STATE_FILE} (corrupt, truncated, or not a ratpt "
                              f"checkpoint: {_short(err)}); {fallback_advice(checkpoint)}") from err
