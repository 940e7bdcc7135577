"""Distributed checkpoints of the megatron engine (`checkpoint.format: distributed`): every rank writes
only its own shards through megatron-core `dist_checkpointing` (torch_dist backend), and any layout
(TP/PP/CP/DP, or one process) reads them back (docs/checkpoints.md#gathered-and-distributed-formats).

    step_XXXXXXXX/
        dist/          every rank's PyTorch DCP shard files, `.metadata`, `metadata.json`, `common.pt` (empty)
        state.pt       rank 0: {"format": "distributed", "step", "data" (loader position), "rng",
                       "bad_in_a_row", "adam_step"}: small, read with weights_only like any checkpoint
        config.yaml, tokenizer/   as for every ratpt checkpoint

Keys are plain-model names, independent of the layout: `model.<name>`, `optimizer.exp_avg.<name>`,
`optimizer.exp_avg_sq.<name>`, each of the plain parameter's shape. A rank writes the part of each
parameter (weight and both AdamW moments) that its optimizer updates: with the distributed optimizer
the flat range of its TP shard that it owns (at most three rectangles, placed through the parameter's
TP placement: megatron's "irregular" sharding), without it the whole shard from the first DP × CP
rank. So every element is written once, by its owner; the last stage's copy of the tied embedding is
not written. Loading requests each rank's TP shard and optimizer range, and DCP reads the overlap with
what was stored; one process reads the full tensors with `read_plain_state`.

Atomic and verified: the shards go into `step_XXXXXXXX.tmp/dist`; once every rank has written (the
finalization of megatron's AsyncRequest) the ranks hash shares of the files, rank 0 writes
`checksums.json` and renames the folder into place (ratpt.checkpoint.finish_checkpoint). Async
(`checkpoint.async_save`): the pieces are staged in host memory at the save call and forked
processes write them while training goes on; `poll` publishes, `wait` blocks,
one save is in flight at a time. Loading unpickles no code: DCP's `.metadata` pickle is checked to
hold only DCP's record types (`_stored_metadata`) before it is read.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import logging
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata, load

from ratpt.parallel.optimizer_state import (ADAM_KEYS, MASTER, local_optimizer_state, owning_optimizer,
                                            scatter_optimizer_state)
from ratpt.checkpoint import (CheckpointError, checkpoint_name, checksums_by_rank, finish_checkpoint, load_checkpoint,
                              start_checkpoint, temporary_dir)
from ratpt.parallel.process_group import on_rank0

log = logging.getLogger(__name__)

FORMAT = "distributed"  # state.pt's "format" for a checkpoint of this kind
DIST_DIR = "dist"


@dataclass(frozen=True)
class _Layout:
    """Where a local parameter lies in its plain parameter: local indices along `dim` map to plain ones
    run by run, (local start, plain start, length); the other dimensions are whole."""
    plain: str
    shape: tuple[int, ...]
    dim: int
    runs: tuple[tuple[int, int, int], ...]
    tp_replicated: bool  # identical on every TP rank (written by TP rank 0)
    duplicate: bool  # a copy of another parameter (the last stage's tied embedding): never written


def is_distributed(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's state.pt (as loaded) belongs to a distributed checkpoint."""
    return state.get("format") == FORMAT


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` allowing only its record types (dataclasses and enums of
    torch.distributed.checkpoint), torch.Size, dtypes and layouts: what weights_only is for tensors."""

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint."):
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata type")


def _stored_metadata(checkpoint: Path):
    """DCP's metadata of `checkpoint`, unpickled without running code (DCP and megatron then read the
    same file with plain pickle), after checking that every tensor is stored whole: its pieces hold
    as many elements as it has (they are disjoint by construction: each is written by its owner)."""
    path = checkpoint / DIST_DIR / ".metadata"
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as err:
        raise CheckpointError(f"cannot read {path} as DCP metadata: {err}") from err
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            stored = sum(math.prod(chunk.sizes) for chunk in meta.chunks)
            if stored != math.prod(meta.size):
                raise CheckpointError(f"{path}: {key} has {stored} of its {math.prod(meta.size)} elements stored; "
                                      "the checkpoint is incomplete")
    return metadata


def _layout(engine, name: str, param: torch.Tensor) -> _Layout:
    p = engine.placements.get(name)
    if p is None or not p.index:  # a full copy of the plain parameter
        return _Layout(engine.plain_name(name), tuple(param.shape), 0, ((0, 0, param.shape[0]),), True,
                       p is not None and p.duplicate)
    runs: list[list[int]] = []
    for local, plain in enumerate(p.index[engine.mesh.tp_rank].tolist()):
        if runs and runs[-1][1] + runs[-1][2] == plain:
            runs[-1][2] += 1
        else:
            runs.append([local, plain, 1])
    shape = list(param.shape)
    shape[p.dim] = p.size
    return _Layout(p.plain, tuple(shape), p.dim, tuple(map(tuple, runs)), p.replicated, p.duplicate)


def _rectangles(shape: tuple[int, ...], start: int, end: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """The flat range [start, end) of a row-major 1-D or 2-D tensor as (offset, size, flat start) rectangles."""
    if len(shape) == 1:
        if end > start:
            yield (start,), (end - start,), start
        return
    if len(shape) != 2:
        raise ValueError(f"distributed checkpoints handle 1-D and 2-D parameters, got shape {tuple(shape)}")
    cols = shape[1]
    row, col = divmod(start, cols)
    if col and start < end:  # the end of a first, partial row
        stop = min(end, (row + 1) * cols)
        yield (row, col), (1, stop - start), start
        start, row = stop, row + 1
    if (end - start) // cols:
        rows = (end - start) // cols
        yield (row, 0), (rows, cols), start
        start, row = start + rows * cols, row + rows
    if end > start:
        yield (row, 0), (1, end - start), start


def _pieces(flat: torch.Tensor, base: int, start: int, end: int, local_shape: tuple[int, ...],
            layout: _Layout) -> Iterator[tuple[torch.Tensor, tuple[int, ...]]]:
    """(view of `flat`, offset in the plain tensor) of every piece of the local range [start, end);
    `flat` holds the local flat elements from index `base` on."""
    d = layout.dim
    for offset, size, first in _rectangles(local_shape, start, end):
        block = flat[first - base:first - base + torch.Size(size).numel()].view(size)
        for local, plain, length in layout.runs:
            lo, hi = max(offset[d], local), min(offset[d] + size[d], local + length)
            if lo < hi:
                where = list(offset)
                where[d] = plain + lo - local
                yield block.narrow(d, lo - offset[d], hi - lo), tuple(where)


def _sharded(key: str, data: torch.Tensor, offset: tuple[int, ...], shape: tuple[int, ...], replica: int):
    from megatron.core.dist_checkpointing import ShardedTensor

    # axis_fragmentations=None: megatron's irregular sharding (pieces of any shape, left to DCP)
    return ShardedTensor(key, data, data.dtype, tuple(data.shape), shape, offset, None, replica)


def _key(kind: str, plain: str) -> str:
    return f"model.{plain}" if kind == MASTER else f"optimizer.{kind}.{plain}"


def _owned(engine, param: nn.Parameter):
    """(this rank's optimizer state of `param`, the first and last+1 flat index of the part this rank
    writes, the flat index the state's tensors start at), or None if it writes nothing of `param`."""
    from megatron.core import parallel_state as ps

    opt, distributed = owning_optimizer(engine.optimizer, param)
    state, where = local_optimizer_state(opt, distributed, param)
    if distributed:
        return None if state is None else (state, where.start, where.stop, where.start)
    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return None  # a replica of DP × CP rank 0's copy
    return state, 0, param.numel(), 0


def sharded_state_dict(engine) -> dict[str, Any]:
    """This rank's pieces of the model and of the AdamW moments, as megatron ShardedTensors (views of the
    live tensors: megatron stages them before writing)."""
    out = {}
    tp_rank = engine.mesh.tp_rank
    for name, param in engine.named_parameters():
        layout = _layout(engine, name, param)
        owned = None if layout.duplicate else _owned(engine, param)
        if owned is None:
            continue
        state, start, end, base = owned
        sources = {MASTER: (state[MASTER].detach().view(-1), base)}  # the fp32 master, not the bf16 copy
        for key in ADAM_KEYS:
            moment = state.get(key)
            sources[key] = (moment.detach().view(-1), base) if moment is not None else (
                torch.zeros(end - start, device=param.device), start)
        replica = tp_rank if layout.tp_replicated else 0
        for kind, (flat, flat_base) in sources.items():
            for data, offset in _pieces(flat, flat_base, start, end, tuple(param.shape), layout):
                out[f"{len(out)}"] = _sharded(_key(kind, layout.plain), data, offset, layout.shape, replica)
    return out


def _adam_step(engine) -> int:
    """AdamW's step count (the same for every parameter), agreed on by all ranks."""
    step = torch.zeros(1, dtype=torch.float64, device=engine.ctx.device)
    for _, param in engine.named_parameters():
        opt, distributed = owning_optimizer(engine.optimizer, param)
        state, _ = local_optimizer_state(opt, distributed, param)
        if state is not None and "step" in state:
            step.fill_(max(step.item(), float(state["step"])))
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    return int(step.item())


def load_sharded(engine, checkpoint: Path, adam_step: int) -> None:
    """Load a distributed checkpoint (written by any layout) into this rank's model part and optimizer
    shard (collective: every rank calls it). Reads the rank's TP shards and its own optimizer range into
    CPU buffers of its parameters' shapes (weight and two moments: 3x its model part, for the duration
    of the load), then loads them as `MegatronEngine.load_state_dict` does."""
    from megatron.core import dist_checkpointing

    _stored_metadata(checkpoint)
    requests, targets = {}, []
    buffers: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in engine.named_parameters():
        layout = _layout(engine, name, param)
        opt, distributed = owning_optimizer(engine.optimizer, param)
        _, where = local_optimizer_state(opt, distributed, param)
        buffers[name] = {kind: torch.zeros(param.shape, dtype=torch.float32) for kind in (MASTER, *ADAM_KEYS)}
        ranges = {MASTER: (0, param.numel())}
        if where is not None:
            ranges.update({key: (where.start, where.stop) for key in ADAM_KEYS})
        for kind, (start, end) in ranges.items():
            for view, offset in _pieces(buffers[name][kind].view(-1), 0, start, end, tuple(param.shape), layout):
                tag = f"{len(requests)}"
                requests[tag] = _sharded(_key(kind, layout.plain), torch.empty(view.shape), offset, layout.shape, 1)
                targets.append((tag, view))
    # NOTE: no access-integrity check: it counts regular-grid shards only, and every rank reads replicas here
    loaded = dist_checkpointing.load(requests, str(checkpoint / DIST_DIR), validate_access_integrity=False)
    for tag, view in targets:
        view.copy_(loaded[tag])
    step = torch.tensor(float(adam_step))
    # Optimizer first: megatron initialises its state with a dummy step that moves parameters.
    scatter_optimizer_state(engine.named_parameters(), engine.optimizer,
                       {name: {"step": step, **b} for name, b in buffers.items()})
    with torch.no_grad():  # the model's copy of the masters (rounded to bf16 under mixed precision)
        for name, param in engine.named_parameters():
            param.copy_(buffers[name][MASTER])


def read_plain_state(checkpoint: Path, optimizer: bool = True) -> dict[str, Any]:
    """The full tensors of distributed checkpoint `checkpoint`, in the gathered checkpoints' form
    ({"model": {name: tensor}, "optimizer": {"adam": {name: {"step", "exp_avg", "exp_avg_sq"}}}}),
    read by this process alone (no process group): one process's resume, `ratpt eval`, `ratpt export`."""
    stored = _stored_metadata(checkpoint).state_dict_metadata
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()
               if isinstance(meta, TensorStorageMetadata) and (optimizer or key.startswith("model."))}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load(tensors, storage_reader=FileSystemReader(str(checkpoint / DIST_DIR)), no_dist=True)
    model = {key.removeprefix("model."): t for key, t in tensors.items() if key.startswith("model.")}
    state: dict[str, Any] = {"model": model}
    if optimizer:
        step = torch.tensor(float(load_checkpoint(checkpoint)["adam_step"]))
        state["optimizer"] = {"adam": {name: {"step": step.clone(), **{key: tensors[f"optimizer.{key}.{name}"]
                                                                        for key in ADAM_KEYS}} for name in model}}
    return state


class DistributedCheckpointer:
    """Writes distributed checkpoints of a MegatronEngine, synchronously or in the background
    (`asynchronous`); at most one save in flight. Every method is collective."""

    def __init__(self, asynchronous: bool) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue() if asynchronous else None

    def save(self, engine, directory: Path, step: int, train_state: dict[str, Any], config_yaml: str,
             tokenizer_dir: Optional[Path], keep: int) -> Path:
        """Write checkpoint `step` (visible under its final name once complete; at return unless
        asynchronous); `train_state` (step, loader position, RNG, …) is captured now."""
        from megatron.core import dist_checkpointing

        self.wait()
        main = dist.get_rank() == 0
        tmp = start_checkpoint(directory, step) if main else temporary_dir(directory, step)
        if main:
            (tmp / DIST_DIR).mkdir()
        dist.barrier()
        state = {**train_state, "format": FORMAT, "adam_step": _adam_step(engine)}
        request = dist_checkpointing.save(sharded_state_dict(engine), str(tmp / DIST_DIR), async_sharded_save=True)

        def finalize() -> None:  # runs on every rank once all ranks' shards and megatron's metadata are written
            checksums = checksums_by_rank(tmp)
            on_rank0(lambda: finish_checkpoint(tmp, state, config_yaml, tokenizer_dir, keep, checksums))

        request.add_finalize_fn(finalize)
        if self.queue is None:
            request.execute_sync()
        else:
            self.queue.schedule_async_request(request)
            if main:
                log.info("checkpoint step %d: shards are being written in the background", step)
        return directory / checkpoint_name(step)

    def poll(self) -> None:
        """Finalize a background save that every rank has finished writing (a one-integer all-reduce)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until a background save is written and finalized."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)
