"""Context parallelism for RAT: sequence-parallel chunk partitioning (docs/design.md#context-parallelism).

Every sequence is cut into blocks of whole chunks and each CP rank holds some of them
(`ContextLayout`, `parallel.context_layout`: `contiguous`, or `zigzag`, whose ranks hold blocks r and
2·CP−1−r and so do equal causal work), so the chunk recurrence never crosses ranks. What does:

    RAT             the chunk summaries (1/L of the tokens), all-gathered with their gradients
                    reduce-scattered; between the kernels' passes with the Triton kernels
                    (`_RATMixingKernels`), `ChunkSummaryAllGather` with the reference ops
    sliding window  the previous block's last W keys and values (`PreviousWindowExchange`)
    attention       K and V, all-gathered (one FlashAttention call per block on GPUs)

Over packed documents (data.document_masking) the blocks stay whole chunks of the sequence and a document
may span them: every rank reads the whole rows' `positions`, RAT also sends each block's last state to the
next block, and every exchange is masked by document (docs/design.md#packed-documents; reference ops).

The model knows none of this: `apply_context_parallel` sets each mixer's `context_shard` (its seam,
default None) to a `ContextShard`, which stands in for `ops.rat_mixing` / `ops.causal_attention` and
gives the global positions of the rank's tokens; `sequence_slice` cuts the batch by the same layout.
`imbalance()` is the busiest rank's FLOPs over the mean, from ratpt.model.flops (measured:
benchmarks/RESULTS.md#context-parallel-balance).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from ratpt import ops
from ratpt.ops.documents import document_ids
from ratpt.ops.rat_mixing import recurrent_states_reference, use_triton
from ratpt.ops.sliding_window_attention import windowed_attention_reference

QUERY_BLOCK = 512  # queries per block: memory O(block × keys), as the single-process ops
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


class _GatherAlongSequence(torch.autograd.Function):
    """All-gather [N, ...] pieces into [CP·N, ...] (rank order); backward reduce-scatters."""

    @staticmethod
    def forward(ctx, piece: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_gather(piece, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.group), None


def _all_gather(piece: torch.Tensor, group) -> torch.Tensor:
    """[N, ...] of every rank -> [CP·N, ...] in rank order."""
    out = piece.new_empty((dist.get_world_size(group) * piece.shape[0], *piece.shape[1:]))
    dist.all_gather_into_tensor(out, piece.contiguous(), group=group)
    return out


def _reduce_scatter(full: torch.Tensor, group) -> torch.Tensor:
    """[CP·N, ...] of every rank, summed over the ranks -> this rank's [N, ...]."""
    piece = full.new_empty((full.shape[0] // dist.get_world_size(group), *full.shape[1:]))
    dist.reduce_scatter_tensor(piece, full.contiguous(), group=group)
    return piece


class ChunkSummaryAllGather:
    """All ranks' chunk summaries [B, H, CP·C, d] (rank order) from this rank's [B, H, C, d]."""

    @staticmethod
    def apply(summaries: torch.Tensor, group) -> torch.Tensor:
        chunks_first = summaries.permute(2, 0, 1, 3)  # [C, B, H, d]: gathered along dim 0
        return _GatherAlongSequence.apply(chunks_first, group).permute(1, 2, 0, 3)


class PreviousWindowExchange(torch.autograd.Function):
    """For each local block, the last W positions of the block before it in the sequence (zeros
    for block 0), from tails [blocks per rank, B, H, W, d]; backward returns the gradients the
    same way, reversed."""

    @staticmethod
    def forward(ctx, tails: torch.Tensor, layout: ContextLayout, group) -> torch.Tensor:
        ctx.layout, ctx.group = layout, group
        return _route(tails.contiguous(), layout, group, step=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _route(grad.contiguous(), ctx.layout, ctx.group, step=-1), None, None


def _route(send: torch.Tensor, layout: ContextLayout, group, step: int) -> torch.Tensor:
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


class _RATMixingKernels(torch.autograd.Function):
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
    sequence = layout.to_sequence_order(_all_gather(piece, group), dim=0).permute(1, 2, 0, 3)  # [B, H, CS, 2d]
    both = sequence.repeat_interleave(n, dim=0)
    return both[..., :d].contiguous(), both[..., d:].contiguous()


def _reduce_summary_gradients(dks: torch.Tensor, dvs: torch.Tensor, batch: int, layout: ContextLayout, group):
    """The inverse of _gather_summaries for gradients: every entry's [B·n, H, CS, d] summed over the
    blocks of a sequence and over the ranks, this rank's own [B·n, H, C, d] returned."""
    n, d = layout.blocks_per_rank, dks.shape[-1]
    both = torch.cat((dks, dvs), dim=-1).unflatten(0, (batch, n)).sum(1)  # [B, H, CS, 2d]
    piece = _reduce_scatter(layout.to_rank_order(both.permute(2, 0, 1, 3), dim=0), group)  # [n·C, B, H, 2d]
    own = piece.unflatten(0, (n, -1)).permute(2, 0, 3, 1, 4).flatten(0, 1)  # [B·n, H, C, 2d]
    return own[..., :d], own[..., d:]


class ContextShard:
    """What a mixer of this CP rank needs: its tokens' positions and cross-rank attention.

    Under train.compile the two mixing methods run eagerly between the compiled parts of a block
    (one graph break per mixer): they hold the exchange's collectives, and around them nothing but
    the kernels (custom ops) and attention calls, which compiling would not fuse further.
    """

    def __init__(self, group, layout: ContextLayout) -> None:
        self.group, self.layout = group, layout

    def positions(self, local_len: int, device=None, documents: torch.Tensor | None = None) -> torch.Tensor:
        """RoPE positions of this rank's tokens: in the sequence, or given whole rows' positions in their
        packed documents [B, S] (`documents`), this rank's part of those."""
        return self.layout.positions(local_len, device) if documents is None else self.layout.local(documents)

    @torch.compiler.disable
    def rat_mixing(self, q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float,
                   kernels: str = "auto", positions: torch.Tensor | None = None) -> torch.Tensor:
        """`ops.rat_mixing` for this rank's chunks: the recurrences are local, RoPE uses the global
        chunk index, the softmax sees the summaries of every earlier chunk. `kernels` as ops.rat_mixing:
        the fused kernels' phases (`_RATMixingKernels`) or the reference composition, which alone masks
        packed documents: `positions` [B, S], each token's position in its document over whole rows
        (docs/design.md#packed-documents)."""
        if positions is None and use_triton(kernels, v, chunk_size, head_dim):
            return _RATMixingKernels.apply(q, k, v, f, gate_bias, self.layout, self.group, chunk_size, head_dim,
                                           rope_base)
        B, T, D = v.shape
        H, G = D // head_dim, q.shape[-1] // head_dim
        g = ops.forget_gate(f, gate_bias)
        if positions is None:
            k_state, v_state = recurrent_states_reference(k, v, g, chunk_size, head_dim)
            chunk = self.positions(T, v.device) // chunk_size
        else:
            positions = self.layout.local(positions)
            states = self._document_states(torch.cat((k.repeat(1, 1, H // G), v), dim=-1), g.repeat(1, 1, 2),
                                           positions % chunk_size == 0, chunk_size)
            k_state, v_state = states.split(D, dim=-1)
            chunk = (positions // chunk_size).unsqueeze(1)  # within the document, [B, 1, T]: over the heads
        q = q.repeat(1, 1, H // G)
        cos, sin = ops.rope_cos_sin(chunk, head_dim, rope_base, v.dtype)

        def heads(t):
            return t.reshape(B, T, H, head_dim).transpose(1, 2)

        y = self.inter_chunk_attention(ops.apply_rope(heads(q), cos, sin), ops.apply_rope(heads(k_state), cos, sin),
                                       heads(v_state), chunk_size, positions=positions)
        return y.transpose(1, 2).reshape(B, T, D)

    def _document_states(self, x: torch.Tensor, g: torch.Tensor, restart: torch.Tensor, chunk_size: int
                         ) -> torch.Tensor:
        """The in-chunk recurrence of x [B, T, D] under gate g over packed documents, restarting where
        `restart` [B, T] (each document chunk's first token). The blocks are cut every L tokens of the
        sequence and a document's chunks from its first token, so a block may begin inside a document
        chunk: its first tokens (fewer than L, up to the next restart) continue the state of the previous
        block's last token, received from its rank and decayed by the gates in between."""
        segments = self.layout.segments(x.shape[1])
        starts = restart.clone()
        starts[:, [lo for lo, _, _ in segments]] = True
        local = ops.reset_scan(x, g, starts)  # each block alone
        tails = torch.stack([local[:, hi - 1] for _, hi, _ in segments])  # [blocks per rank, B, D]
        carried = PreviousWindowExchange.apply(tails, self.layout, self.group)
        gates = g.to(torch.promote_types(g.dtype, x.dtype)).masked_fill(restart.unsqueeze(-1), 0)
        pieces = []
        for slot, (lo, hi, _) in enumerate(segments):
            head = slice(lo, lo + chunk_size)  # a block holds at least one chunk: the carry ends in it
            decay = torch.cumprod(gates[:, head], dim=1)  # 0 from the block's first restart on
            pieces += [local[:, head] + decay * carried[slot].unsqueeze(1), local[:, lo + chunk_size:hi]]
        return torch.cat([p.to(x.dtype) for p in pieces], dim=1)

    def inter_chunk_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                              query_block: int = QUERY_BLOCK, positions: torch.Tensor | None = None) -> torch.Tensor:
        """`ops.inter_chunk_attention` on this rank's chunks, seeing the summaries of every earlier chunk;
        over packed documents (`positions` [B, T] of this rank's tokens), those of its own document's.

        Every L tokens of the sequence hold one summary slot, exchanged across the ranks. Without documents
        it is the chunk's last token. With them the summaries are the tokens at p mod L = L − 1, at least L
        apart (within a document by L; the next document's first one L − 1 past its start), so each L
        tokens hold at most one, in their slot (zeros in a slot without). A document starting at s has
        its summaries in consecutive slots from ceil(s / L): a token at chunk c of it sees slots
        [ceil(s / L), ceil(s / L) + c), which may include the slot of its own L tokens."""
        T, L = q.shape[2], chunk_size
        kv = torch.cat((k, v), dim=-1)
        if positions is None:
            own, first_chunk, ahead = kv[:, :, L - 1::L], None, 0
            query_chunk = (self.positions(T, q.device) // L).unsqueeze(0)
        else:
            summary = (positions % L == L - 1)[:, None, :, None]
            own = torch.where(summary, kv, 0).unflatten(2, (T // L, L)).sum(3)
            first_chunk = (self.positions(T, q.device) - positions + L - 1) // L  # ceil(document start / L)
            query_chunk, ahead = first_chunk + positions // L, 1
        summaries = self.layout.to_sequence_order(ChunkSummaryAllGather.apply(own, self.group), dim=2)
        summary_k, summary_v = summaries.split(k.shape[-1], dim=-1)
        block = L * max(1, query_block // L)
        outputs = []
        for lo, hi, first in self.layout.segments(T):
            for start in range(lo, hi, block):
                stop = min(start + block, hi)
                visible = (first + stop - 1 - lo) // L + ahead  # the chunks before the query block's last token's
                args = (q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
                        summary_k[:, :, :visible], summary_v[:, :, :visible], query_chunk[:, start:stop],
                        None if first_chunk is None else first_chunk[:, start:stop])
                if torch.is_grad_enabled():
                    outputs.append(checkpoint(ops.attend_summaries, *args, use_reentrant=False))
                else:
                    outputs.append(ops.attend_summaries(*args))
        return torch.cat(outputs, dim=2)

    @torch.compiler.disable
    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                         query_block: int = QUERY_BLOCK, positions: torch.Tensor | None = None) -> torch.Tensor:
        """`ops.causal_attention` for this rank's queries: full attention all-gathers K and V,
        a sliding window receives the last W keys and values before each of the rank's blocks. Over
        packed documents (`positions` [B, S] of whole rows) a query sees only its own document's keys,
        whose ids every rank reads from the whole rows (no exchange): the reference, in query blocks."""
        segments = self.layout.segments(q.shape[2])
        kv = torch.cat((k, v), dim=-1)
        documents = None if positions is None else document_ids(positions)
        if window is None:
            gathered = _GatherAlongSequence.apply(kv.permute(2, 0, 1, 3), self.group)
            sequence = self.layout.to_sequence_order(gathered, dim=0).permute(1, 2, 0, 3).contiguous()
            keys, values = sequence.split(k.shape[-1], -1)
            if documents is not None:  # a window as long as the rows: causal, masked by document
                outputs = [windowed_attention_reference(q[:, :, lo:hi], keys, values, documents.shape[1], start, 0,
                                                        query_block, documents) for lo, hi, start in segments]
                return torch.cat(outputs, dim=2)
            outputs = [_attend_prefix(q[:, :, lo:hi], keys[:, :, :start + hi - lo], values[:, :, :start + hi - lo])
                       for lo, hi, start in segments]
            return torch.cat(outputs, dim=2)
        # NOTE: block 0 receives zeros at positions < 0 (masked), but keeps them in its graph so
        # that its rank's backward takes part in the exchange of gradients.
        tails = torch.stack([kv[:, :, hi - window:hi] for _, hi, _ in segments])
        previous = PreviousWindowExchange.apply(tails, self.layout, self.group)
        outputs = []
        for slot, (lo, hi, start) in enumerate(segments):
            keys, values = torch.cat((previous[slot], kv[:, :, lo:hi]), dim=2).split(k.shape[-1], dim=-1)
            args = (q[:, :, lo:hi], keys, values, window, start, start - window, query_block)
            outputs.append(ops.windowed_attention(*args) if documents is None
                           else windowed_attention_reference(*args, documents))
        return torch.cat(outputs, dim=2)


def _attend_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last q.shape[2] positions of a prefix over all of its keys.

    One SDPA call with a lower-right causal bias: on GPUs that is FlashAttention (no mask, memory
    O(T), its own recomputation in backward); elsewhere the bias is materialised. The earlier
    per-512-query masked blocks ran out of 139 GiB on CP 2 for attention-1.3B at 131072 tokens.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))


def apply_context_parallel(model: torch.nn.Module, group, rank: int, size: int, layout: str) -> None:
    """Give every sequence mixer of `model` this rank's `ContextShard` under `layout`
    (parallel.context_layout; the batch must be cut by `sequence_slice` with the same one)."""
    unsupported = [type(m).__name__ for m in model.modules() if type(m).__name__ == "RNNMixer"]
    if unsupported:
        raise NotImplementedError("context parallelism of the RNN layer (a recurrence over the whole sequence) "
                                  "needs a cross-rank scan; use parallel.context=1 for models with rnn layers")
    shard = ContextShard(group, ContextLayout(layout, rank, size))
    for module in model.modules():
        if hasattr(module, "context_shard"):
            module.context_shard = shard


def imbalance(cfg, seq_len: int, cp: int) -> dict[str, float]:
    """Busiest CP rank's forward FLOPs over the mean, per layout (1.0 = balanced)."""
    return {layout: _busiest_over_mean(cfg, seq_len, cp, layout) for layout in LAYOUTS}


def _busiest_over_mean(cfg, seq_len: int, cp: int, layout: str) -> float:
    from ratpt.model.config import mixer_of_layer
    from ratpt.model.flops import ffn_flops_per_token, head_flops_per_token, projection_flops_per_token

    per_rank = []
    for r in range(cp):
        positions = ContextLayout(layout, r, cp).positions(seq_len // cp).to(torch.float64)
        total = 0.0
        for layer in range(cfg.n_layers):
            kind = mixer_of_layer(cfg, layer)
            keys = _mean_keys(kind, cfg, positions)
            total += projection_flops_per_token(kind, cfg) + 4.0 * cfg.d_model * keys + ffn_flops_per_token(cfg)
        per_rank.append(total + head_flops_per_token(cfg))
    return max(per_rank) / (sum(per_rank) / cp)


def _mean_keys(kind: str, cfg, t: torch.Tensor) -> float:
    """Mean softmax keys per query over positions `t` (as ratpt.model.flops counts)."""
    if kind == "rnn":
        return 0.0
    if kind == "attention":
        return float((t + 1).mean())
    if kind == "swa":
        return float(torch.clamp(t, max=cfg.window).add(1).mean())
    if kind == "rat":
        return float((t // cfg.chunk_size).add(1).mean())
    raise ValueError(f"unknown mixer {kind!r}")


__all__ = ["LAYOUTS", "ChunkSummaryAllGather", "ContextLayout", "ContextShard", "PreviousWindowExchange",
           "apply_context_parallel", "imbalance", "sequence_slice"]
