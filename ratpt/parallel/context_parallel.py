"""Context parallelism for RAT: sequence-parallel chunk partitioning (docs/design.md#context-parallelism).

Every sequence is cut into blocks of whole chunks and each CP rank holds some of them
(`ContextLayout`, `parallel.context_layout`: `contiguous`, or `zigzag`, whose ranks hold blocks r and
2·CP−1−r and so do equal causal work), so the chunk recurrence never crosses ranks. What does:

    RAT             the chunk summaries (1/L of the tokens), all-gathered with their gradients
                    reduce-scattered; between the kernels' passes with the Triton kernels
                    (`RATMixingKernels`), `ChunkSummaryAllGather` with the reference ops
    sliding window  the previous block's last W keys and values (`PreviousWindowExchange`)
    attention       K and V, all-gathered (one FlashAttention call per block on GPUs)

Over packed documents (data.document_masking) the blocks stay whole chunks of the sequence and a document
may span them: every rank reads the whole rows' `positions` and every exchange is masked by document
(docs/design.md#packed-documents). RAT's kernels also receive the L − 1 tokens before each block (a document
chunk may straddle two; `RATDocumentMixingKernels`); its reference receives the previous block's last state.

The blocks and their exchanges are in ratpt.parallel.context_blocks, RAT's kernel phases in
ratpt.parallel.context_rat_kernels.

The model knows none of this: `apply_context_parallel` sets each mixer's `context_shard` (its seam,
default None) to a `ContextShard`, which stands in for `ops.rat_mixing` / `ops.causal_attention` and
gives the global positions of the rank's tokens; `sequence_slice` cuts the batch by the same layout.
`imbalance()` is the busiest rank's FLOPs over the mean, from ratpt.model.flops (measured:
benchmarks/RESULTS.md#context-parallel-balance).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from ratpt import ops
from ratpt.ops.documents import document_ids
from ratpt.ops.rat_mixing import recurrent_states_reference, use_triton
from ratpt.ops.sliding_window_attention import windowed_attention_reference
from ratpt.parallel.context_blocks import (LAYOUTS, ChunkSummaryAllGather, ContextLayout, GatherAlongSequence,
                                          PreviousWindowExchange)
from ratpt.parallel.context_rat_kernels import DocumentBlocks, RATDocumentMixingKernels, RATMixingKernels

QUERY_BLOCK = 512  # queries per block: memory O(block × keys), as the single-process ops


class ContextShard:
    """What a mixer of this CP rank needs: its tokens' positions and cross-rank attention.

    Under train.compile the two mixing methods run eagerly between the compiled parts of a block
    (one graph break per mixer): they hold the exchange's collectives, and around them nothing but
    the kernels (custom ops) and attention calls, which compiling would not fuse further.
    """

    def __init__(self, group, layout: ContextLayout) -> None:
        self.group, self.layout = group, layout
        self._document_blocks: tuple[torch.Tensor, int, int, DocumentBlocks] | None = None

    def positions(self, local_len: int, device=None, documents: torch.Tensor | None = None) -> torch.Tensor:
        """RoPE positions of this rank's tokens: in the sequence, or given whole rows' positions in their
        packed documents [B, S] (`documents`), this rank's part of those."""
        return self.layout.positions(local_len, device) if documents is None else self.layout.local(documents)

    @torch.compiler.disable
    def rat_mixing(self, q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float,
                   kernels: str = "auto", positions: torch.Tensor | None = None) -> torch.Tensor:
        """`ops.rat_mixing` for this rank's chunks: the recurrences are local, RoPE uses the global
        chunk index, the softmax sees the summaries of every earlier chunk. `kernels` as ops.rat_mixing:
        the fused kernels' phases (`RATMixingKernels`, `RATDocumentMixingKernels` over packed documents) or the
        reference composition. `positions` [B, S]: each token's position in its packed document over whole rows
        (docs/design.md#packed-documents)."""
        if use_triton(kernels, v, chunk_size, head_dim):
            if positions is None:
                return RATMixingKernels.apply(q, k, v, f, gate_bias, self.layout, self.group, chunk_size, head_dim,
                                              rope_base)
            return RATDocumentMixingKernels.apply(q, k, v, f, gate_bias,
                                                  self.document_blocks(positions, v.shape[1], chunk_size),
                                                  self.layout, self.group, chunk_size, head_dim, rope_base)
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

    def document_blocks(self, positions: torch.Tensor, local_len: int, chunk_size: int) -> DocumentBlocks:
        """The kernels' chunk tables of this rank's blocks (DocumentBlocks), built once per batch: every RAT
        layer of a forward (and its recomputation) passes the same `positions`."""
        cached = self._document_blocks
        if cached is None or cached[0] is not positions or cached[1:3] != (local_len, chunk_size):
            blocks = DocumentBlocks.of(positions, self.layout, local_len, chunk_size)
            self._document_blocks = cached = (positions, local_len, chunk_size, blocks)
        return cached[3]

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
            gathered = GatherAlongSequence.apply(kv.permute(2, 0, 1, 3), self.group)
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


__all__ = ["ContextShard", "apply_context_parallel", "imbalance"]
