"""Context parallelism for RAT: sequence-parallel chunk partitioning (DESIGN §3).

Each of the CP ranks holds one contiguous run of whole chunks of every sequence (tokens
[r·T/CP, (r+1)·T/CP)), so the chunk recurrence never crosses ranks. What does cross:

    RAT             the chunk summaries k̃[c, L-1], ṽ[c, L-1] (1/L of the tokens) are all-gathered
                    in forward (`ChunkSummaryAllGather`) and their gradients reduce-scattered in
                    backward; a token attends to every earlier rank's summaries, then to its own
                    rank's as in one process. RoPE uses the global chunk index.
    sliding window  the previous rank's last W keys and values (`PreviousWindowExchange`,
                    point-to-point; gradients go back the same way).
    attention       all-gather of K and V (gradients reduce-scattered); queries see the
                    keys of earlier ranks and their own causal block.
    everything else (embedding, norms, FFN, head, loss) is per token and needs nothing.

The model knows none of this: `apply_context_parallel` sets each mixer's `context_shard`
attribute (the model's documented seam, default None) to a `ContextShard`, whose methods take
the place of `ops.inter_chunk_attention` / `ops.causal_attention` and give the rank's first
token position.

Causal imbalance: with equal contiguous slices a later rank attends to more summaries. Per
token this costs 4·D·(keys) FLOPs against ~2·D·(3D + 2Gd + D) + 4·D·F for the projections and FFN,
and `imbalance()` computes the ratio of the busiest to the average rank from the model's FLOP
model (ratpt.model.flops); the benchmark reports it (e.g. RAT-1.3B at 128K tokens on CP 2).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ratpt import ops

QUERY_BLOCK = 512  # queries per block: memory O(block × keys), as the single-process ops


def sequence_slice(t: torch.Tensor, mesh) -> torch.Tensor:
    """This CP rank's contiguous slice of [B, T, ...] (the whole tensor without CP)."""
    if mesh.cp == 1:
        return t
    local = t.shape[1] // mesh.cp
    return t[:, mesh.cp_rank * local:(mesh.cp_rank + 1) * local]


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


class ChunkSummaryAllGather:
    """All ranks' chunk summaries [B, H, CP·C, d] from this rank's [B, H, C, d]."""

    @staticmethod
    def apply(summaries: torch.Tensor, group) -> torch.Tensor:
        chunks_first = summaries.permute(2, 0, 1, 3)  # [C, B, H, d]: gathered along dim 0
        return _GatherAlongSequence.apply(chunks_first, group).permute(1, 2, 0, 3)


class PreviousWindowExchange(torch.autograd.Function):
    """Receive the previous rank's last W positions of [B, H, W, d] (zeros on rank 0) while
    sending ours to the next rank; backward returns the gradients the same way, reversed."""

    @staticmethod
    def forward(ctx, tail: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        received = torch.zeros_like(tail)
        _shift(tail.contiguous(), received, group, forward=True)
        return received

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_tail = torch.zeros_like(grad)
        _shift(grad.contiguous(), grad_tail, ctx.group, forward=False)
        return grad_tail, None


def _shift(send: torch.Tensor, recv: torch.Tensor, group, forward: bool) -> None:
    """forward: rank r sends to r+1 and receives from r-1; backward the reverse."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    to, frm = (rank + 1, rank - 1) if forward else (rank - 1, rank + 1)
    ops_ = []
    if 0 <= to < size:
        ops_.append(dist.P2POp(dist.isend, send, dist.get_global_rank(group, to), group))
    if 0 <= frm < size:
        ops_.append(dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, frm), group))
    if ops_:
        for req in dist.batch_isend_irecv(ops_):
            req.wait()


class ContextShard:
    """What a mixer of this CP rank needs: its first position and cross-rank attention."""

    def __init__(self, group, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size

    def first_token(self, local_len: int) -> int:
        return self.rank * local_len

    def rat_mixing(self, q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float) -> torch.Tensor:
        """`ops.rat_mixing` (its reference composition) for this rank's chunks: the recurrences are
        local, RoPE uses the global chunk index, the softmax sees every earlier rank's summaries."""
        B, T, D = v.shape
        H, G = D // head_dim, q.shape[-1] // head_dim
        dtype = torch.promote_types(torch.promote_types(f.dtype, gate_bias.dtype), torch.float32)
        g = torch.sigmoid(f.to(dtype) + gate_bias.to(dtype))
        q, k = q.repeat(1, 1, H // G), k.repeat(1, 1, H // G)
        k_state, v_state = ops.chunk_scan(k, g, chunk_size), ops.chunk_scan(v, g, chunk_size)
        chunk = (self.first_token(T) + torch.arange(T, device=v.device)) // chunk_size
        cos, sin = ops.rope_cos_sin(chunk, head_dim, rope_base, v.dtype)

        def heads(t):
            return t.reshape(B, T, H, head_dim).transpose(1, 2)

        y = self.inter_chunk_attention(ops.apply_rope(heads(q), cos, sin), ops.apply_rope(heads(k_state), cos, sin),
                                       heads(v_state), chunk_size)
        return y.transpose(1, 2).reshape(B, T, D)

    def inter_chunk_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                              query_block: int = QUERY_BLOCK) -> torch.Tensor:
        """`ops.inter_chunk_attention` on this rank's chunks, seeing every earlier rank's summaries."""
        T, L = q.shape[2], chunk_size
        own_k, own_v = k[:, :, L - 1::L], v[:, :, L - 1::L]
        gathered = ChunkSummaryAllGather.apply(torch.cat((own_k, own_v), dim=-1), self.group)
        before = self.rank * (T // L)  # summaries of earlier ranks: visible to every local query
        prior_k, prior_v = gathered[:, :, :before].split(k.shape[-1], dim=-1)
        block = L * max(1, query_block // L)
        local_chunk = torch.arange(T, device=q.device) // L
        outputs = []
        for start in range(0, T, block):
            stop = min(start + block, T)
            n_local = int(local_chunk[stop - 1])
            args = (q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
                    torch.cat((prior_k, own_k[:, :, :n_local]), dim=2),
                    torch.cat((prior_v, own_v[:, :, :n_local]), dim=2),
                    (local_chunk[start:stop] + before).unsqueeze(0))
            if torch.is_grad_enabled():
                outputs.append(checkpoint(ops.attend_summaries, *args, use_reentrant=False))
            else:
                outputs.append(ops.attend_summaries(*args))
        return torch.cat(outputs, dim=2)

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                         query_block: int = QUERY_BLOCK) -> torch.Tensor:
        """`ops.causal_attention` for this rank's queries: full attention all-gathers K and V,
        a sliding window receives the previous rank's last W keys and values."""
        T = q.shape[2]
        start = self.first_token(T)
        if window is None:
            kv = _GatherAlongSequence.apply(torch.cat((k, v), dim=-1).permute(2, 0, 1, 3), self.group)
            kv = kv[: start + T].permute(1, 2, 0, 3)
            key_start = 0
        else:
            tail = torch.cat((k, v), dim=-1)[:, :, T - window:]
            # NOTE: rank 0 receives zeros at positions < 0 (masked), but keeps them in its graph
            # so that its backward takes part in the exchange of gradients.
            previous = PreviousWindowExchange.apply(tail, self.group)
            kv = torch.cat((previous, torch.cat((k, v), dim=-1)), dim=2)
            key_start = start - window
        keys, values = kv.split(k.shape[-1], dim=-1)
        return _masked_attention(q, keys, values, start, key_start, window, query_block)


def _masked_attention(q, k, v, q_start: int, k_start: int, window: int | None, query_block: int):
    """Causal (optionally windowed) attention of queries at positions q_start + i over keys at
    k_start + j, in query blocks against only the keys a block can reach."""
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
        outputs.append(F.scaled_dot_product_attention(
            q[:, :, lo:hi], k[:, :, first:last], v[:, :, first:last], attn_mask=allowed))
    return torch.cat(outputs, dim=2)


def apply_context_parallel(model: torch.nn.Module, group, rank: int, size: int) -> None:
    """Give every sequence mixer of `model` this rank's `ContextShard` (the model's CP seam)."""
    shard = ContextShard(group, rank, size)
    for module in model.modules():
        if hasattr(module, "context_shard"):
            module.context_shard = shard
    unsupported = [type(m).__name__ for m in model.modules() if type(m).__name__ == "RNNMixer"]
    if unsupported:
        raise NotImplementedError("context parallelism of the RNN layer (a recurrence over the whole sequence) "
                                  "needs a cross-rank scan; use parallel.context=1 for models with rnn layers")


def imbalance(cfg, seq_len: int, cp: int) -> float:
    """Busiest CP rank's forward FLOPs over the mean, for equal contiguous slices (1.0 = balanced)."""
    from ratpt.model.config import mixer_of_layer
    from ratpt.model.flops import ffn_flops_per_token, head_flops_per_token, projection_flops_per_token

    local = seq_len // cp
    per_rank = []
    for r in range(cp):
        total = 0.0
        for layer in range(cfg.n_layers):
            kind = mixer_of_layer(cfg, layer)
            keys = _mean_keys(kind, cfg, r * local, local)
            total += projection_flops_per_token(kind, cfg) + 4.0 * cfg.d_model * keys + ffn_flops_per_token(cfg)
        per_rank.append(total + head_flops_per_token(cfg))
    return max(per_rank) / (sum(per_rank) / cp)


def _mean_keys(kind: str, cfg, start: int, n: int) -> float:
    """Mean softmax keys per query over positions [start, start + n) (as ratpt.model.flops counts)."""
    t = torch.arange(start, start + n, dtype=torch.float64)
    if kind == "rnn":
        return 0.0
    if kind == "attention":
        return float((t + 1).mean())
    if kind == "swa":
        return float(torch.clamp(t, max=cfg.window).add(1).mean())
    if kind == "rat":
        return float((t // cfg.chunk_size).add(1).mean())
    raise ValueError(f"unknown mixer {kind!r}")


__all__ = ["ChunkSummaryAllGather", "ContextShard", "PreviousWindowExchange", "apply_context_parallel",
           "imbalance", "sequence_slice"]
