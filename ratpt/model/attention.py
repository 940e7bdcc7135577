"""Softmax attention mixer: causal (full) or sliding window (docs/design.md#the-language-model).

As the reference code: pre-norm `input_norm`, `in_proj` rows v, q, k (all H heads, no output
gate), RoPE over token positions, `out_proj`, residual. With a window W a token sees itself and
the W previous tokens; its cache is then a ring of the last W + 1 (k, v). Over packed documents
(`positions`) a token sees only its own document, with RoPE over its position there.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ratpt import ops
from ratpt.model.cache import KVCache, ensure_slots, write_slots
from ratpt.model.config import ModelConfig, n_heads
from ratpt.model.norm import RMSNorm
from ratpt.ops.documents import Documents
from ratpt.ops.sliding_window_attention import QUERY_BLOCK


class AttentionMixer(nn.Module):
    # Context-parallel seam (docs/design.md#context-parallelism): None here; ratpt.parallel.context_parallel
    # sets it to an object giving the global positions of this rank's tokens and a causal_attention() over
    # all ranks' keys.
    context_shard = None

    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        D = cfg.d_model
        # Tensor-parallel seam: ratpt.parallel.tensor_parallel sets d_model, n_heads to one rank's share.
        self.d_model, self.head_dim, self.n_heads = D, cfg.head_dim, n_heads(cfg)
        self.window = window
        self.rope_base = cfg.rope_base
        self.kernels = cfg.kernels
        self.input_norm = RMSNorm(D, cfg.norm_eps)
        self.in_proj = nn.Linear(D, 3 * D, bias=False)
        self.out_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor, documents: Documents | None = None) -> torch.Tensor:
        """x [B, T, D]; documents: the batch's packed documents (None: one per row)."""
        return self._mix(x, documents)[0]

    def prefill(self, x: torch.Tensor, lengths: torch.Tensor, capacity: int) -> tuple[torch.Tensor, KVCache]:
        """Forward over a right-padded batch; cache (k, v) in slots for `capacity` tokens (attention)
        or in the ring of W + 1 slots (sliding window)."""
        out, k, v = self._mix(x)
        if self.window is None:
            return out, KVCache(k=ensure_slots(k, capacity), v=ensure_slots(v.contiguous(), capacity))
        # Ring slot s holds the latest position p < length with p = s (mod W + 1), if any.
        slots = torch.arange(self.window + 1, device=x.device)
        held = slots + (self.window + 1) * torch.div(lengths.unsqueeze(-1) - 1 - slots, self.window + 1,
                                                     rounding_mode="floor")
        held = held.clamp(0, x.shape[1] - 1)  # slots never written (s >= length) stay masked
        index = held[:, None, :, None].expand(-1, self.n_heads, -1, self.head_dim)
        return out, KVCache(k=k.gather(2, index), v=v.gather(2, index), window=self.window)

    def decode(self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        """One token per sequence: x [B, 1, D] at `positions` [B]; updates `cache` in place.

        The token's (k, v) is written to its slot first, then the query attends over every slot
        written so far, and reads no other: slot s <= position, in the full cache (slot = position) and
        in the ring (slot = position mod (W + 1); once full, all W + 1 slots are the window). Static shapes.
        """
        h = ops.decode_linear(x, self.in_proj.weight, self.input_norm.weight, self.input_norm.eps, kernels=self.kernels)
        # one position per sequence: the tables are q's size, so compiled they fuse into the rotation
        q, k, v = self._qkv(h, positions.unsqueeze(-1), x.dtype, tables=ops.rope_tables)
        slots = cache.k.shape[2]
        slot = positions if self.window is None else positions % slots
        write_slots(cache.k, slot, k[:, :, 0])
        write_slots(cache.v, slot, v[:, :, 0])
        y = ops.attention_decode(q, cache.k, cache.v, torch.clamp(positions + 1, max=slots), self.kernels)
        return ops.decode_linear(self._merge(y), self.out_proj.weight, residual=x, kernels=self.kernels)

    def extend(self, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Continue a prefill with x [B, P, D] at positions start … start + P - 1 of every sequence:
        attention writes the piece's (k, v) to their slots and its queries see every earlier slot; a
        window reads the W positions before the piece from the ring, then refills the ring with the last
        W + 1. Updates `cache` in place; memory is one piece's scores, block by block."""
        P, W = x.shape[1], self.window
        positions = start + torch.arange(P, device=x.device)
        q, k, v = self._qkv(self.in_proj(self.input_norm(x)), positions, x.dtype)
        if W is None:  # every earlier key is in its slot
            cache.k[:, :, start:start + P], cache.v[:, :, start:start + P] = k, v
            first, keys, values = 0, cache.k, cache.v
        else:  # the W positions before the piece, read from the ring, then the piece's own
            first = max(0, start - W)
            ring = torch.arange(first, start, device=x.device) % (W + 1)
            keys, values = torch.cat((cache.k[:, :, ring], k), dim=2), torch.cat((cache.v[:, :, ring], v), dim=2)
            n = min(W + 1, start + P - first)  # the ring after the piece: its last W + 1 positions
            kept = torch.arange(start + P - n, start + P, device=x.device) % (W + 1)
            cache.k[:, :, kept], cache.v[:, :, kept] = keys[:, :, -n:], values[:, :, -n:]
        outputs = []
        for a in range(0, P, QUERY_BLOCK):
            b = min(a + QUERY_BLOCK, P)
            low = first if W is None else max(first, start + a - W)  # the earliest position the block may see
            key_pos = torch.arange(low, start + b, device=x.device)
            allowed = key_pos <= positions[a:b, None]
            if W is not None:
                allowed &= positions[a:b, None] - key_pos <= W
            outputs.append(F.scaled_dot_product_attention(
                q[:, :, a:b], keys[:, :, low - first:start + b - first], values[:, :, low - first:start + b - first],
                attn_mask=allowed))
        return x + self.out_proj(self._merge(torch.cat(outputs, dim=2)))

    def _mix(self, x: torch.Tensor, documents: Documents | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # T from the projection: under tensor parallelism x is this rank's sequence slice and
        # in_proj returns the whole sequence for this rank's heads (ratpt.parallel.tensor_parallel)
        h = self.in_proj(self.input_norm(x))
        T = h.shape[1]
        positions = torch.arange(T, device=x.device)
        attend = ops.causal_attention
        doc_positions = None if documents is None else documents.positions
        if documents is not None:
            positions, attend = doc_positions, functools.partial(ops.document_attention, positions=doc_positions,
                                                                 block_mask=documents.block_masks.get(self.window))
        if self.context_shard is not None:  # this CP rank's tokens (packed documents' positions: whole rows)
            positions = self.context_shard.positions(T, x.device, doc_positions)
            attend = functools.partial(self.context_shard.causal_attention, positions=doc_positions)
        q, k, v = self._qkv(h, positions, x.dtype)
        y = attend(q, k, v, window=self.window)
        return x + self.out_proj(self._merge(y)), k, v

    def _qkv(self, h: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, tables=ops.rope_cos_sin):
        """Rotated q, k and v as [B, H, T, d] from h = in_proj(input_norm(x)); positions broadcastable
        to [B, T]; RoPE tables (from `tables`) in the dtype of x."""
        B, T, _ = h.shape
        v, q, k = (t.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for t in h.split(self.d_model, dim=-1))
        cos, sin = tables(positions, self.head_dim, self.rope_base, dtype)
        if cos.dim() == 3:  # per-sequence positions [B, T, d] -> [B, 1, T, d]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin), v

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        B, H, T, d = t.shape
        return t.transpose(1, 2).reshape(B, T, H * d)
