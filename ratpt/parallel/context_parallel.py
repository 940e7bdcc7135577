"""Context parallelism for RAT: sequence-parallel chunk partitioning (DESIGN §3).

Every sequence is cut into equal blocks of whole chunks and each of the CP ranks holds some of
them (`ContextLayout`, `parallel.context_layout`), so the chunk recurrence never crosses ranks:

    contiguous      CP blocks; rank r holds block r (tokens [r·T/CP, (r+1)·T/CP)).
    zigzag          2·CP blocks; rank r holds blocks r and 2·CP−1−r, in that order (the usual
                    load-balanced causal assignment): an early and a late block each, so every
                    rank attends over the same number of keys.

What crosses ranks:

    RAT             the chunk summaries k̃[c, L-1], ṽ[c, L-1] (1/L of the tokens) are all-gathered
                    in forward (`ChunkSummaryAllGather`, then put in sequence order) and their
                    gradients reduce-scattered in backward; a token attends to the summaries of
                    every earlier chunk, wherever it lives, with RoPE over the global chunk index.
    sliding window  each block receives the last W keys and values of the block before it from
                    the rank that holds it (`PreviousWindowExchange`, point-to-point or a local
                    copy; gradients go back the same way).
    attention       all-gather of K and V (gradients reduce-scattered), put in sequence order;
                    each block's queries see the keys up to their own positions.
    everything else (embedding, norms, FFN, head, loss) is per token and needs nothing; the
                    batch is cut by the same layout (`sequence_slice`), labels with the tokens.

The model knows none of this: `apply_context_parallel` sets each mixer's `context_shard`
attribute (the model's documented seam, default None) to a `ContextShard`, whose methods take
the place of `ops.rat_mixing` / `ops.causal_attention` and give the global positions of the
rank's tokens.

Causal imbalance: a later token attends to more keys (summaries, or tokens for attention). Per
token this costs 4·D·(keys) FLOPs against ~2·D·(3D + 2Gd + D) + 4·D·F for the projections and
FFN; `imbalance()` gives the busiest rank's FLOPs over the mean for both layouts from the model's
FLOP model (ratpt.model.flops). With contiguous halves (CP 2) rank 1 does 3/4 of the causal
triangle, and the summary attention is most of a RAT layer's time at long contexts
(kernels/NOTES.md): RAT-1.3B at 128K on CP 2 is 1.12× by FLOPs contiguous, 1.00× zigzag
(benchmarks/cp_balance.py measures the time).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ratpt import ops
from ratpt.ops.rat_mixing import use_triton

QUERY_BLOCK = 512  # queries per block: memory O(block × keys), as the single-process ops
PRIOR_QUERY_BLOCK = 4096  # the kernels' path: queries per block of the attention over earlier blocks' summaries
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
        if self.kind == "contiguous":
            return gathered
        order = [r * self.blocks_per_rank + slot for r, slot in map(self.holder, range(self.n_blocks))]
        blocks = gathered.unflatten(dim, (self.n_blocks, -1))
        return blocks.index_select(dim, torch.tensor(order, device=gathered.device)).flatten(dim, dim + 1)


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
        size = dist.get_world_size(group)
        out = piece.new_empty((size * piece.shape[0], *piece.shape[1:]))
        dist.all_gather_into_tensor(out, piece.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        piece = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        dist.reduce_scatter_tensor(piece, grad.contiguous(), group=ctx.group)
        return piece, None


class _JoinGraph(torch.autograd.Function):
    """Identity on x that puts `other` in its graph (with a zero gradient): a rank whose blocks attend
    to no earlier summaries (rank 0, contiguous) must still run the summaries gather's backward, a
    reduce-scatter every rank joins, which also brings it the gradients of its own summaries."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        ctx.other = (other.shape, other.dtype, other.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.other
        return grad, torch.zeros(shape, dtype=dtype, device=device)


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


class ContextShard:
    """What a mixer of this CP rank needs: its tokens' positions and cross-rank attention."""

    def __init__(self, group, layout: ContextLayout) -> None:
        self.group, self.layout = group, layout

    def positions(self, local_len: int, device=None) -> torch.Tensor:
        return self.layout.positions(local_len, device)

    def rat_mixing(self, q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float,
                   kernels: str = "auto") -> torch.Tensor:
        """`ops.rat_mixing` for this rank's chunks: the recurrences are local, RoPE uses the global
        chunk index, the softmax sees the summaries of every earlier chunk. `kernels` as ops.rat_mixing:
        the fused kernels (`_rat_mixing_kernels`) or the reference composition."""
        if use_triton(kernels, v, chunk_size, head_dim):
            return self._rat_mixing_kernels(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base)
        B, T, D = v.shape
        H, G = D // head_dim, q.shape[-1] // head_dim
        dtype = torch.promote_types(torch.promote_types(f.dtype, gate_bias.dtype), torch.float32)
        g = torch.sigmoid(f.to(dtype) + gate_bias.to(dtype))
        q, k = q.repeat(1, 1, H // G), k.repeat(1, 1, H // G)
        k_state, v_state = ops.chunk_scan(k, g, chunk_size), ops.chunk_scan(v, g, chunk_size)
        cos, sin = ops.rope_cos_sin(self.positions(T, v.device) // chunk_size, head_dim, rope_base, v.dtype)

        def heads(t):
            return t.reshape(B, T, H, head_dim).transpose(1, 2)

        y = self.inter_chunk_attention(ops.apply_rope(heads(q), cos, sin), ops.apply_rope(heads(k_state), cos, sin),
                                       heads(v_state), chunk_size)
        return y.transpose(1, 2).reshape(B, T, D)

    def _rat_mixing_kernels(self, q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float):
        """The fused kernels run each of this rank's blocks as a sequence of its own (y, its softmax
        normaliser, its chunk summaries); the summaries of all ranks are gathered, and each block's y
        is merged with an attention over the summaries of every earlier block by the two
        normalisers. Exact: one softmax over a union of keys is the normaliser-weighted mean of the
        softmaxes over the parts. RoPE needs no care inside a block (scores depend on chunk index
        differences only); gathered summaries are rotated on by their block's first chunk index."""
        from kernels import rat_mixing_parts

        B, T, D = v.shape
        H, G, L, d = D // head_dim, q.shape[-1] // head_dim, chunk_size, head_dim
        n_local = self.layout.blocks_per_rank

        def blocks_as_batch(t):  # [B, T, ...] -> [B · blocks, T / blocks, ...], a view of the column slices
            return t.unflatten(1, (n_local, T // n_local)).flatten(0, 1)

        y, lse, ks, vs = rat_mixing_parts(*(blocks_as_batch(t) for t in (q, k, v, f)), gate_bias, L, d, rope_base)
        block_chunks = ks.shape[2]
        own = torch.cat((ks, vs), dim=-1).unflatten(0, (B, n_local)).transpose(1, 2).flatten(2, 3)
        summaries = self.layout.to_sequence_order(ChunkSummaryAllGather.apply(own, self.group), dim=2)
        first_chunk = torch.arange(summaries.shape[2], device=v.device) // block_chunks * block_chunks
        summary_k = ops.apply_rope(summaries[..., :d], *ops.rope_cos_sin(first_chunk, d, rope_base, v.dtype))
        summary_v = summaries[..., d:]
        q_heads = q.repeat(1, 1, H // G).unflatten(-1, (H, d)).transpose(1, 2)
        y, lse = y.unflatten(0, (B, n_local)), lse.unflatten(0, (B, n_local))
        outputs = []
        for slot, (lo, hi, start) in enumerate(self.layout.segments(T)):
            visible = start // L  # every chunk of the earlier blocks
            if visible == 0:  # the first block: its own summaries only (the kernels saw them)
                outputs.append(_JoinGraph.apply(y[:, slot], summaries))
                continue
            chunk = torch.arange(start, start + hi - lo, device=v.device) // L  # global chunk index
            q_rot = ops.apply_rope(q_heads[:, :, lo:hi], *ops.rope_cos_sin(chunk, d, rope_base, v.dtype))
            y_prior, lse_prior = _attention_with_normaliser(q_rot, summary_k[:, :, :visible],
                                                            summary_v[:, :, :visible])
            total = torch.logaddexp(lse[:, slot], lse_prior)
            own_weight = torch.exp(lse[:, slot] - total).transpose(1, 2).unsqueeze(-1)  # [B, n, H, 1]
            prior_weight = torch.exp(lse_prior - total).transpose(1, 2).unsqueeze(-1)
            merged = y[:, slot].unflatten(-1, (H, d)) * own_weight + y_prior.transpose(1, 2) * prior_weight
            outputs.append(merged.flatten(2).to(v.dtype))
        return torch.cat(outputs, dim=1)

    def inter_chunk_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                              query_block: int = QUERY_BLOCK) -> torch.Tensor:
        """`ops.inter_chunk_attention` on this rank's chunks, seeing the summaries of every earlier chunk."""
        T, L = q.shape[2], chunk_size
        own = torch.cat((k[:, :, L - 1::L], v[:, :, L - 1::L]), dim=-1)
        summaries = self.layout.to_sequence_order(ChunkSummaryAllGather.apply(own, self.group), dim=2)
        summary_k, summary_v = summaries.split(k.shape[-1], dim=-1)
        chunk = self.positions(T, q.device) // L
        block = L * max(1, query_block // L)
        outputs = []
        for lo, hi, first in self.layout.segments(T):
            for start in range(lo, hi, block):
                stop = min(start + block, hi)
                visible = (first + stop - 1 - lo) // L  # the chunks before the query block's last token's
                args = (q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
                        summary_k[:, :, :visible], summary_v[:, :, :visible], chunk[start:stop].unsqueeze(0))
                if torch.is_grad_enabled():
                    outputs.append(checkpoint(ops.attend_summaries, *args, use_reentrant=False))
                else:
                    outputs.append(ops.attend_summaries(*args))
        return torch.cat(outputs, dim=2)

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                         query_block: int = QUERY_BLOCK) -> torch.Tensor:
        """`ops.causal_attention` for this rank's queries: full attention all-gathers K and V,
        a sliding window receives the last W keys and values before each of the rank's blocks."""
        segments = self.layout.segments(q.shape[2])
        kv = torch.cat((k, v), dim=-1)
        if window is None:
            gathered = _GatherAlongSequence.apply(kv.permute(2, 0, 1, 3), self.group)
            keys, values = self.layout.to_sequence_order(gathered, dim=0).permute(1, 2, 0, 3).split(k.shape[-1], -1)
            outputs = [_masked_attention(q[:, :, lo:hi], keys, values, start, 0, None, query_block)
                       for lo, hi, start in segments]
            return torch.cat(outputs, dim=2)
        # NOTE: block 0 receives zeros at positions < 0 (masked), but keeps them in its graph so
        # that its rank's backward takes part in the exchange of gradients.
        tails = torch.stack([kv[:, :, hi - window:hi] for _, hi, _ in segments])
        previous = PreviousWindowExchange.apply(tails, self.layout, self.group)
        outputs = []
        for slot, (lo, hi, start) in enumerate(segments):
            keys, values = torch.cat((previous[slot], kv[:, :, lo:hi]), dim=2).split(k.shape[-1], dim=-1)
            outputs.append(_masked_attention(q[:, :, lo:hi], keys, values, start, start - window, window, query_block))
        return torch.cat(outputs, dim=2)


def _attention_with_normaliser(q, k, v, query_block: int = PRIOR_QUERY_BLOCK):
    """Unmasked softmax attention of q [B, H, Q, d] over k, v [B, H, N, d]: y [B, H, Q, d] (fp32) and the
    natural-log normaliser [B, H, Q], in query blocks recomputed in backward (memory O(block × N))."""
    def block(qb, kb, vb):
        scores = torch.matmul(qb, kb.transpose(-1, -2)).float() / math.sqrt(qb.shape[-1])
        lse = torch.logsumexp(scores, dim=-1)
        return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)).to(vb.dtype), vb).float(), lse

    parts = [checkpoint(block, q[:, :, lo:lo + query_block], k, v, use_reentrant=False) if torch.is_grad_enabled()
             else block(q[:, :, lo:lo + query_block], k, v) for lo in range(0, q.shape[2], query_block)]
    return torch.cat([y for y, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)


def _masked_attention(q, k, v, q_start: int, k_start: int, window: int | None, query_block: int):
    """Causal (optionally windowed) attention of queries at positions q_start + i over keys at
    k_start + j, in query blocks against only the keys a block can reach. Without a window each
    block is recomputed in backward: what SDPA saves per block (its keys and values made contiguous,
    the mask) would otherwise grow as T²/block; attention-1.3B at 131072 tokens on CP 2 ran out of
    139 GiB without this."""
    T = q.shape[2]
    outputs = []
    for lo in range(0, T, query_block):
        hi = min(lo + query_block, T)
        q_pos = torch.arange(q_start + lo, q_start + hi, device=q.device).unsqueeze(-1)
        first = 0 if window is None else max(0, q_start + lo - window - k_start)
        last = q_start + hi - k_start  # keys up to the block's last query
        k_pos = torch.arange(k_start + first, k_start + last, device=q.device)
        allowed = (k_pos <= q_pos) & (k_pos >= 0)
        if window is not None:
            allowed &= q_pos - k_pos <= window
        args = (q[:, :, lo:hi], k[:, :, first:last], v[:, :, first:last])
        if window is None and torch.is_grad_enabled():
            outputs.append(checkpoint(F.scaled_dot_product_attention, *args, attn_mask=allowed, use_reentrant=False))
        else:
            outputs.append(F.scaled_dot_product_attention(*args, attn_mask=allowed))
    return torch.cat(outputs, dim=2)


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
