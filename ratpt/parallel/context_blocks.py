"""Which blocks of every sequence each context-parallel rank holds, and the exchanges between the blocks.

A sequence is cut into blocks of whole chunks (`ContextLayout`: `contiguous`, or `zigzag`, whose ranks hold
blocks r and 2·CP−1−r and so do equal causal work). What crosses the ranks goes through the collectives here:
all-gathers along the sequence (summaries, keys and values) with their reduce-scattered gradients, and a block's
tail sent to the rank of the next block (`route`: a sliding window's previous keys, a recurrence's carried
state, the tokens of a chunk that straddles two blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class ContextLayout:
    """Which blocks of every sequence CP rank `rank` of `size` holds, in its local order."""
    kind: str
    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"parallel.context_layout must be one of {'|'.join(LAYOUTS)}, got {self.kind!r}")

    @property
    def blocks_per_rank(self) -> int:
        return 2 if self.kind == "zigzag" else 1

    @property
    def n_blocks(self) -> int:
        return self.size * self.blocks_per_rank

    def blocks(self, rank: int | None = None) -> tuple[int, ...]:
        r = self.rank if rank is None else rank
        return (r, 2 * self.size - 1 - r) if self.kind == "zigzag" else (r,)

    def holder(self, block: int) -> tuple[int, int]:
        """(rank, local slot) of a block."""
        if self.kind == "zigzag" and block >= self.size:
            return 2 * self.size - 1 - block, 1
        return block, 0

    def segments(self, local_len: int) -> list[tuple[int, int, int]]:
        """(local start, local stop, global start) of each of this rank's blocks."""
        n = local_len // self.blocks_per_rank
        return [(slot * n, (slot + 1) * n, block * n) for slot, block in enumerate(self.blocks())]

    def positions(self, local_len: int, device=None) -> torch.Tensor:
        """Global positions of this rank's `local_len` tokens."""
        return torch.cat([torch.arange(start, start + hi - lo, device=device)
                          for lo, hi, start in self.segments(local_len)])

    def local(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of whole sequences along `dim`."""
        n = t.shape[dim] // self.n_blocks
        return torch.cat([t.narrow(dim, block * n, n) for block in self.blocks()], dim=dim)

    def to_sequence_order(self, gathered: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's local part, concatenated in rank order along `dim`, put in sequence order."""
        return self._reorder(gathered, dim, self._rank_positions())

    def to_rank_order(self, sequence: torch.Tensor, dim: int) -> torch.Tensor:
        """The inverse of to_sequence_order: blocks in sequence order along `dim`, put in rank order."""
        positions = self._rank_positions()
        return self._reorder(sequence, dim, sorted(range(self.n_blocks), key=positions.__getitem__))

    def _rank_positions(self) -> list[int]:
        """Where each block of the sequence sits in rank order (rank · blocks per rank + slot)."""
        return [r * self.blocks_per_rank + slot for r, slot in map(self.holder, range(self.n_blocks))]

    def _reorder(self, t: torch.Tensor, dim: int, blocks: list[int]) -> torch.Tensor:
        """The blocks of t along `dim`, in the order `blocks` lists them."""
        if self.kind == "contiguous":
            return t
        index = torch.tensor(blocks, device=t.device)
        return t.unflatten(dim, (self.n_blocks, -1)).index_select(dim, index).flatten(dim, dim + 1)


def sequence_slice(t: torch.Tensor, mesh, layout: str) -> torch.Tensor:
    """This CP rank's part of [B, T, ...] under `layout` (parallel.context_layout); the whole tensor without CP."""
    if mesh.cp == 1:
        return t
    return ContextLayout(layout, mesh.cp_rank, mesh.cp).local(t)


class GatherAlongSequence(torch.autograd.Function):
    """All-gather [N, ...] pieces into [CP·N, ...] (rank order); backward reduce-scatters."""

    @staticmethod
    def forward(ctx, piece: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return all_gather(piece, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter(grad, ctx.group), None


def all_gather(piece: torch.Tensor, group) -> torch.Tensor:
    """[N, ...] of every rank -> [CP·N, ...] in rank order."""
    out = piece.new_empty((dist.get_world_size(group) * piece.shape[0], *piece.shape[1:]))
    dist.all_gather_into_tensor(out, piece.contiguous(), group=group)
    return out


def reduce_scatter(full: torch.Tensor, group) -> torch.Tensor:
    """[CP·N, ...] of every rank, summed over the ranks -> this rank's [N, ...]."""
    piece = full.new_empty((full.shape[0] // dist.get_world_size(group), *full.shape[1:]))
    dist.reduce_scatter_tensor(piece, full.contiguous(), group=group)
    return piece


class ChunkSummaryAllGather:
    """All ranks' chunk summaries [B, H, CP·C, d] (rank order) from this rank's [B, H, C, d]."""

    @staticmethod
    def apply(summaries: torch.Tensor, group) -> torch.Tensor:
        chunks_first = summaries.permute(2, 0, 1, 3)  # [C, B, H, d]: gathered along dim 0
        return GatherAlongSequence.apply(chunks_first, group).permute(1, 2, 0, 3)


class PreviousWindowExchange(torch.autograd.Function):
    """For each local block, the last W positions of the block before it in the sequence (zeros
    for block 0), from tails [blocks per rank, B, H, W, d]; backward returns the gradients the
    same way, reversed."""

    @staticmethod
    def forward(ctx, tails: torch.Tensor, layout: ContextLayout, group) -> torch.Tensor:
        ctx.layout, ctx.group = layout, group
        return route(tails.contiguous(), layout, group, step=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return route(grad.contiguous(), ctx.layout, ctx.group, step=-1), None, None


def route(send: torch.Tensor, layout: ContextLayout, group, step: int) -> torch.Tensor:
    """out[slot of block b + step] = send[slot of block b] for every block, across the ranks (a copy
    where one rank holds both). Messages are posted in the order of their source block on both
    ends, so two messages between the same ranks would still match."""
    out = torch.zeros_like(send)
    posted = []
    for slot, block in enumerate(layout.blocks()):
        if 0 <= block + step < layout.n_blocks:
            rank, to_slot = layout.holder(block + step)
            if rank == layout.rank:
                out[to_slot] = send[slot]
            else:
                posted.append((block, dist.P2POp(dist.isend, send[slot], dist.get_global_rank(group, rank), group)))
        if 0 <= block - step < layout.n_blocks:
            rank, _ = layout.holder(block - step)
            if rank != layout.rank:
                posted.append((block - step, dist.P2POp(dist.irecv, out[slot], dist.get_global_rank(group, rank),
                                                        group)))
    if posted:
        for req in dist.batch_isend_irecv([op for _, op in sorted(posted, key=lambda p: p[0])]):
            req.wait()
    return out
