"""RAT's mixing under context parallelism through the fused Triton kernels' phases (kernels/rat_fwd.py,
kernels/rat_bwd.py), the chunk summaries exchanged between them.

Each rank's blocks run as sequences of their own (a batch of B·n entries, n blocks per rank), their chunks
numbered globally by a per-entry chunk offset, attending to the whole sequence's summaries.

Over packed documents (`RATDocumentMixingKernels`) a document's chunks start at its first token, so a chunk may
straddle two blocks. The chunk table is the whole rows' (the same on every rank), each entry holding the chunks
that have a token in its block; the block is extended backwards by the L − 1 tokens of the block before it
(received from that rank), so that the chunk straddling its start is whole there and its recurrence needs no
state from another rank. A chunk's summary belongs to the block holding its last token; the summaries are summed
into the whole sequence's table across the ranks (each rank fills its own chunks, zeros elsewhere), and their
gradients come back the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ratpt.ops.documents import CHUNKS_MULTIPLE, DocumentChunks
from ratpt.parallel.context_blocks import ContextLayout, all_gather, reduce_scatter, route


class RATMixingKernels(torch.autograd.Function):
    """RAT mixing of this rank's blocks through the fused kernels' phases, with the chunk summaries
    exchanged between them. Forward: every block's states and summaries (rotated by their global
    chunk index), an all-gather of all ranks' summaries, then every block's softmax over its own
    state and the sequence's summaries j < its chunk. Backward: every block's summary gradients,
    summed over the blocks and reduce-scattered to the ranks that own the summaries, then every
    block's input gradients. One softmax per token, as in one process: nothing to merge."""

    @staticmethod
    def forward(ctx, q, k, v, f, gate_bias, layout: ContextLayout, group, chunk_size: int, head_dim: int,
                rope_base: float):
        from ratpt_kernels.rat_fwd import rat_states, summary_attention

        B, T, D = v.shape
        n = layout.blocks_per_rank
        starts = [start // chunk_size for _, _, start in layout.segments(T)]
        offset = torch.tensor(starts * B, dtype=torch.int32, device=v.device)  # entry b·n + slot
        q_, k_, v_, f_ = (_blocks_as_batch(t, n) for t in (q, k, v, f))
        kst, vst, ks_own, vs_own = rat_states(k_, v_, f_, gate_bias, chunk_size, head_dim, rope_base, offset)
        ks, vs = _gather_summaries(ks_own, vs_own, B, layout, group)
        y, lse = summary_attention(q_, kst, vst, ks, vs, chunk_size, head_dim, rope_base, offset)
        ctx.save_for_backward(q, k, v, f, gate_bias, y, lse, ks, vs, offset)
        ctx.setup = (layout, group, chunk_size, head_dim, rope_base)
        return y.view(B, T, D)

    @staticmethod
    def backward(ctx, dy):
        from ratpt_kernels.rat_bwd import input_gradients, summary_gradients

        q, k, v, f, gate_bias, y, lse, ks, vs, offset = ctx.saved_tensors
        layout, group, L, d, rope_base = ctx.setup
        B, T, D = v.shape
        n = layout.blocks_per_rank
        q_, k_, v_, f_ = (_blocks_as_batch(t, n) for t in (q, k, v, f))
        dks, dvs, reused = summary_gradients(dy.contiguous().view(y.shape), q_, y, lse, ks, vs, L, d, rope_base,
                                             offset)
        dks_own, dvs_own = _reduce_summary_gradients(dks, dvs, B, layout, group)
        dq, dk, dv, df, dbias = input_gradients(q_, k_, v_, f_, gate_bias, lse, ks, vs, reused, dks_own, dvs_own,
                                                L, d, rope_base, offset)
        return (*(g.view(B, T, -1) for g in (dq, dk, dv, df)), dbias, None, None, None, None, None)


def _blocks_as_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T, ...] -> [B·n, T/n, ...]: each of a rank's n blocks as a sequence of its own (a view of the
    projection's column slices, entry b·n + slot)."""
    return t.unflatten(1, (n, t.shape[1] // n)).flatten(0, 1)


def _gather_summaries(ks_own: torch.Tensor, vs_own: torch.Tensor, batch: int, layout: ContextLayout, group):
    """Every entry's Ks, Vs [B·n, H, CS, d]: the whole sequence's summaries, in sequence order, from
    each rank's own [B·n, H, C, d] (C per block)."""
    n, d = layout.blocks_per_rank, ks_own.shape[-1]
    own = torch.cat((ks_own, vs_own), dim=-1).unflatten(0, (batch, n))  # [B, n, H, C, 2d]
    piece = own.permute(1, 3, 0, 2, 4).flatten(0, 1)  # [n·C, B, H, 2d]: local sequence order
    sequence = layout.to_sequence_order(all_gather(piece, group), dim=0).permute(1, 2, 0, 3)  # [B, H, CS, 2d]
    both = sequence.repeat_interleave(n, dim=0)
    return both[..., :d].contiguous(), both[..., d:].contiguous()


def _reduce_summary_gradients(dks: torch.Tensor, dvs: torch.Tensor, batch: int, layout: ContextLayout, group):
    """The inverse of _gather_summaries for gradients: every entry's [B·n, H, CS, d] summed over the
    blocks of a sequence and over the ranks, this rank's own [B·n, H, C, d] returned."""
    n, d = layout.blocks_per_rank, dks.shape[-1]
    both = torch.cat((dks, dvs), dim=-1).unflatten(0, (batch, n)).sum(1)  # [B, H, CS, 2d]
    piece = reduce_scatter(layout.to_rank_order(both.permute(2, 0, 1, 3), dim=0), group)  # [n·C, B, H, 2d]
    own = piece.unflatten(0, (n, -1)).permute(2, 0, 3, 1, 4).flatten(0, 1)  # [B·n, H, C, 2d]
    return own[..., :d], own[..., d:]


@dataclass
class DocumentBlocks:
    """The chunk tables of a rank's blocks over packed documents, as the kernels read them: for entry e = b·n +
    slot (sequence b, local block `slot`) the chunks c0[e] .. of the whole row's table (DocumentChunks of the
    whole rows) that have a token in the block, numbered from `offset` = c0 (int32 [B·n]). `documents` (first
    chunk, chunk start; int32 [B·n, C]) in the extended block (`halo` tokens of the previous block, then the
    block's own): first chunks global, starts local, the chunks past the block's last one empty. `chunk`
    ([B·n, C] int64): each local chunk's global index (clamped to the table); `owned` ([B·n, C] bool): whether
    its last token is in the block, which makes its summary this block's; `halo_covered` ([B·n, halo] bool):
    the halo tokens that are in a chunk of the block (the rest are read by nothing)."""

    halo: int
    n_chunks: int
    offset: torch.Tensor
    documents: tuple[torch.Tensor, torch.Tensor]
    chunk: torch.Tensor
    owned: torch.Tensor
    halo_covered: torch.Tensor

    @classmethod
    def of(cls, positions: torch.Tensor, layout: ContextLayout, local_len: int, chunk_size: int) -> DocumentBlocks:
        """From `positions` [B, S], the whole rows' positions in their documents (ratpt.ops.documents). Syncs
        with the host (the table's width): once per forward, not per layer."""
        L, halo = chunk_size, chunk_size - 1
        table = DocumentChunks.of(positions, L)
        start, first = table.start.long(), table.first_chunk.long()
        B, n_chunks = start.shape
        segments = layout.segments(local_len)
        ends = torch.tensor([g + hi - lo for lo, hi, g in segments], device=start.device)  # [n]
        begins = ends - (segments[0][1] - segments[0][0])
        # the chunks holding each block's first and last token, per (sequence, block)
        c0 = torch.searchsorted(start, begins.expand(B, -1).contiguous(), right=True) - 1  # [B, n]
        c1 = torch.searchsorted(start, (ends - 1).expand(B, -1).contiguous(), right=True) - 1
        span = int((c1 - c0).max()) + 1
        width = -(-span // CHUNKS_MULTIPLE) * CHUNKS_MULTIPLE
        chunk = c0.unsqueeze(-1) + torch.arange(width, device=start.device)  # [B, n, C]
        valid = chunk <= c1.unsqueeze(-1)
        clamped = chunk.clamp(max=n_chunks - 1)
        rows = torch.arange(B, device=start.device)[:, None, None]
        extended = halo + ends - begins  # the extended block's length
        origin = (begins - halo)[None, :, None]  # the extended block's first token in the row
        local_start = torch.where(valid, start[rows, clamped] - origin, extended[None, :, None])
        next_start = torch.where(chunk + 1 < n_chunks, start[rows, (chunk + 1).clamp(max=n_chunks - 1)],
                                 positions.shape[1])
        owned = valid & (next_start <= ends[None, :, None])
        first_local = torch.where(valid, first[rows, clamped], chunk)  # past the block: its own index (no document)
        covered = torch.arange(halo, device=start.device) >= local_start[..., :1]  # [B, n, halo]
        c0, first_local, local_start, clamped, owned, covered = (
            t.flatten(0, 1) for t in (c0, first_local, local_start, clamped, owned, covered))  # entries b·n + slot
        return cls(halo=halo, n_chunks=n_chunks, offset=c0.int(),
                   documents=(first_local.int().contiguous(), local_start.int().contiguous()),
                   chunk=clamped, owned=owned, halo_covered=covered)

    def share_summaries(self, ks_own: torch.Tensor, vs_own: torch.Tensor, batch: int, group):
        """Every entry's Ks, Vs [B·n, H, CS, d] of the whole sequence's chunks, from each entry's own local
        [B·n, H, C, d] (summed across the ranks: each chunk's summary comes from the one block that owns it)."""
        d = ks_own.shape[-1]
        own = torch.cat((ks_own, vs_own), dim=-1) * self.owned[:, None, :, None]
        index = self.chunk[:, None, :, None].expand_as(own)
        table = own.new_zeros(*own.shape[:2], self.n_chunks, 2 * d).scatter_add_(2, index, own)  # [B·n, H, CS, 2d]
        table = table.unflatten(0, (batch, -1)).sum(1)
        dist.all_reduce(table, group=group)
        both = table.repeat_interleave(self.offset.shape[0] // batch, dim=0)
        return both[..., :d].contiguous(), both[..., d:].contiguous()

    def own_summary_gradients(self, dks: torch.Tensor, dvs: torch.Tensor, batch: int, group):
        """The inverse of share_summaries for gradients: every entry's [B·n, H, CS, d], summed over the blocks
        and the ranks, each entry's owned local chunks' [B·n, H, C, d] (zeros for the rest)."""
        d = dks.shape[-1]
        total = torch.cat((dks, dvs), dim=-1).unflatten(0, (batch, -1)).sum(1)  # [B, H, CS, 2d]
        dist.all_reduce(total, group=group)
        sequence = torch.arange(batch, device=total.device).repeat_interleave(self.offset.shape[0] // batch)
        own = total[sequence[:, None], :, self.chunk].permute(0, 2, 1, 3)  # [B·n, H, C, 2d]
        own = own * self.owned[:, None, :, None]
        return own[..., :d].contiguous(), own[..., d:].contiguous()


class RATDocumentMixingKernels(torch.autograd.Function):
    """RATMixingKernels over packed documents (`blocks`, DocumentBlocks): each block extended by the previous
    block's last L − 1 tokens of k, v, f (route), its chunks read in place through its chunk table, the
    summaries shared by `DocumentBlocks.share_summaries`. Backward: the summary gradients shared back, then the
    input gradients, the halo's sent to the rank of the block it came from and added to its tail's."""

    @staticmethod
    def forward(ctx, q, k, v, f, gate_bias, blocks: DocumentBlocks, layout: ContextLayout, group,
                chunk_size: int, head_dim: int, rope_base: float):
        from ratpt_kernels.rat_fwd import rat_states, summary_attention

        B, T, D = v.shape
        n, h = layout.blocks_per_rank, blocks.halo
        tails = torch.cat([_blocks_as_batch(t, n)[:, T // n - h:] for t in (k, v, f)], dim=-1)  # [B·n, h, W]
        received = _route_entries(tails, layout, group, step=1)  # the previous block's (zeros for the first)
        qx, kx, vx, fx = _extended(q, k, v, f, received, n)
        kst, vst, ks_own, vs_own = rat_states(kx, vx, fx, gate_bias, chunk_size, head_dim, rope_base, blocks.offset,
                                              blocks.documents)
        ks, vs = blocks.share_summaries(ks_own, vs_own, B, group)
        y, lse = summary_attention(qx, kst, vst, ks, vs, chunk_size, head_dim, rope_base, blocks.offset,
                                   documents=blocks.documents)
        y[:, :h] = 0  # the previous block's tokens: their outputs are that block's (Δ = Σ dy·y reads 0)
        # the inputs, not their extended copies (a projection's worth per layer): the backward rebuilds those
        ctx.save_for_backward(q, k, v, f, received, gate_bias, y, lse, ks, vs)
        ctx.setup = (blocks, layout, group, chunk_size, head_dim, rope_base)
        return y[:, h:].reshape(B, T, D)

    @staticmethod
    def backward(ctx, dy):
        from ratpt_kernels.rat_bwd import input_gradients, summary_gradients

        q, k, v, f, received, gate_bias, y, lse, ks, vs = ctx.saved_tensors
        blocks, layout, group, L, d, rope_base = ctx.setup
        B, T, D = dy.shape
        n, h = layout.blocks_per_rank, blocks.halo
        qx, kx, vx, fx = _extended(q, k, v, f, received, n)
        dyx = _after_zeros(_blocks_as_batch(dy, n), h)
        dks, dvs, reused = summary_gradients(dyx, qx, y, lse, ks, vs, L, d, rope_base, blocks.offset,
                                             documents=blocks.documents)
        dks_own, dvs_own = blocks.own_summary_gradients(dks, dvs, B, group)
        dq, dk, dv, df, dbias = input_gradients(qx, kx, vx, fx, gate_bias, lse, ks, vs, reused, dks_own, dvs_own,
                                                L, d, rope_base, blocks.offset, documents=blocks.documents)
        dkvf = torch.cat((dk, dv, df), dim=-1)
        halo = torch.where(blocks.halo_covered.unsqueeze(-1), dkvf[:, :h], 0)  # the rest was written by no kernel
        own = dkvf[:, h:].clone()
        own[:, own.shape[1] - h:] += _route_entries(halo, layout, group, step=-1)  # from the next block's halo
        dk, dv, df = own.reshape(B, T, -1).split([dk.shape[-1], D, D], dim=-1)
        return dq[:, h:].reshape(B, T, -1), dk, dv, df, dbias, None, None, None, None, None, None


def _route_entries(rows: torch.Tensor, layout: ContextLayout, group, step: int) -> torch.Tensor:
    """`route` of entries [B·n, r, W] (entry b·n + slot): each entry's rows to the entry of the block `step`
    after it in the sequence, from whichever rank holds that one (zeros where no block sends)."""
    by_slot = rows.unflatten(0, (-1, layout.blocks_per_rank)).transpose(0, 1).contiguous()  # [n, B, r, W]
    return route(by_slot, layout, group, step).transpose(0, 1).flatten(0, 1)


def _extended(q, k, v, f, received: torch.Tensor, n: int):
    """q, k, v, f of the extended blocks [B·n, halo + T/n, ·]: the received rows of k, v, f (columns as
    `received`) before each entry's own, written once into one buffer; q has zeros there (those rows' outputs
    are the previous block's)."""
    E, h = received.shape[:2]
    kvf = received.new_empty(E, h + k.shape[1] // n, received.shape[-1])
    kvf[:, :h] = received
    widths = [k.shape[-1], v.shape[-1], f.shape[-1]]
    for part, t in zip(kvf[:, h:].split(widths, dim=-1), (k, v, f)):
        part.copy_(_blocks_as_batch(t, n))
    return (_after_zeros(_blocks_as_batch(q, n), h), *kvf.split(widths, dim=-1))


def _after_zeros(entries: torch.Tensor, rows: int) -> torch.Tensor:
    """Entries [B·n, m, W] with `rows` rows of zeros before each."""
    return torch.cat((entries.new_zeros(entries.shape[0], rows, entries.shape[-1]), entries), dim=1)
