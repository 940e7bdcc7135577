"""Attention's decode step as one op: one query per (sequence, head) over the slots of a (k, v) cache
that hold tokens (docs/design.md#generation-and-its-caches).

The full cache's slot s holds position s and the sliding window's ring fills slots 0, 1, … in order:
in both, the slots holding tokens at position p are the first min(p + 1, slots), so `visible` [B]
counts them and the softmax runs over those only. `kernels` dispatches like rat_mixing ("auto" = the
length-aware Triton kernel on CUDA, which reads only the visible slots; the reference masks the rest).
"""
import torch
import torch.nn.functional as F

from ratpt.ops.rat_mixing import use_triton


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, visible: torch.Tensor,
                     kernels: str = "auto") -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v [B, H, 1, d] of q [B, H, 1, d] over slots s < visible[b] of the caches
    [B, H, slots, d] (1 <= visible <= slots). Static shapes, no host synchronisation."""
    # chunk size 1: a shape the RAT kernels support for every head width they support
    if use_triton(kernels, q, 1, q.shape[-1]):
        from ratpt_kernels import attention_decode as triton_attention_decode
        return triton_attention_decode(q, k_cache, v_cache, visible)
    return attention_decode_reference(q, k_cache, v_cache, visible)


def attention_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               visible: torch.Tensor) -> torch.Tensor:
    """attention_decode through SDPA with a boolean mask over every slot."""
    mask = torch.arange(k_cache.shape[2], device=q.device) < visible.unsqueeze(-1)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask[:, None, None, :])
