"""Causal softmax attention inside each packed document, full or in a sliding window
(docs/design.md#packed-documents): a block-diagonal causal mask.

A query sees the keys of its own document at or before it (and, with a window W, at most W before it). In
training on CUDA (`flex_runs`) this is FlexAttention over a block mask built from the batch's document ids,
compiled, so the key blocks of other documents are skipped; elsewhere the reference runs query blocks
through SDPA with a boolean mask from the same rule, exact in float64.
"""
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from ratpt.ops.documents import document_ids
from ratpt.ops.sliding_window_attention import FLEX_BLOCK, QUERY_BLOCK, flex, flex_runs


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       window: int | None = None, query_block: int = QUERY_BLOCK,
                       block_mask: BlockMask | None = None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v over the keys `document_mask` allows; q, k, v [B, H, T, d] (RoPE applied),
    positions [B, T] (ratpt.ops.documents). `block_mask`: document_block_mask(positions, window), built once
    for all the layers of a forward (else here, where FlexAttention runs)."""
    if flex_runs(q):
        return flex(q, k, v, block_mask if block_mask is not None else document_block_mask(positions, window))
    return document_attention_reference(q, k, v, document_mask(document_ids(positions), window), window, query_block)


def document_block_mask(positions: torch.Tensor, window: int | None) -> BlockMask:
    """FlexAttention's block mask of document_attention over positions [B, T]: the key blocks of other
    documents (and outside the window) skipped, the partial ones masked per element. Built by a compiled
    function where it is called eagerly (once per forward, Documents), so that the [B, T, T] element mask
    never exists whole: at 128K it would not fit."""
    B, T = positions.shape
    visible = document_mask(document_ids(positions), window)
    return create_block_mask(visible, B, None, T, T, device=positions.device, BLOCK_SIZE=FLEX_BLOCK,
                             _compile=not torch.compiler.is_compiling())


def document_mask(documents: torch.Tensor, window: int | None) -> Callable:
    """FlexAttention's mask_mod of document_attention over document ids [B, T]; it also takes broadcast index
    tensors and returns the dense mask (the reference)."""
    def visible(b, h, q_idx, kv_idx):
        allowed = (kv_idx <= q_idx) & (documents[b, q_idx] == documents[b, kv_idx])
        return allowed if window is None else allowed & (q_idx - kv_idx <= window)

    return visible


def document_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Callable,
                                 window: int | None, query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """document_attention in query blocks, each against the keys up to its last query (only the window's,
    with one): memory O(T·block), or O(block·(block + W))."""
    B, _, T, _ = q.shape
    batch = torch.arange(B, device=q.device)[:, None, None]
    outputs = []
    for lo in range(0, T, query_block):
        hi = min(lo + query_block, T)
        first = 0 if window is None else max(0, lo - window)
        allowed = visible(batch, None, torch.arange(lo, hi, device=q.device)[None, :, None],
                          torch.arange(first, hi, device=q.device)[None, None, :])
        outputs.append(F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, first:hi], v[:, :, first:hi],
                                                      attn_mask=allowed.unsqueeze(1)))
    return torch.cat(outputs, dim=2)
