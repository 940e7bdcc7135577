"""Causal softmax attention, full or restricted to a sliding window (docs/design.md#the-language-model).

With a window W a token attends to itself and the W previous tokens (W + 1 keys). Full attention is
one SDPA call (FlashAttention / cuDNN on GPUs). In training on CUDA the window runs as FlexAttention over
a block mask, compiled, which skips the key blocks outside every query block's window (O(T·W) work and
memory, forward and backward). Elsewhere (CPU, eager inference) it runs the reference, over query blocks
each against only the keys its window can reach through SDPA with a boolean mask (O(T·(block + W))
memory), exact in float64 (FlexAttention has no backward on CPU).
"""
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

QUERY_BLOCK = 512  # queries per block of the reference window path and of a continued prefill (extend)
FLEX_BLOCK = 128  # tokens per block of the FlexAttention block mask (the kernels' tile)


@functools.cache
def _compiled_flex_attention():
    """Built at first use: torch.compile imports dynamo and inductor, two seconds of every process's start
    that runs no FlexAttention (CPU, generation, the data tools)."""
    return torch.compile(flex_attention, dynamic=False)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     window: int | None = None, query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v over allowed keys; q, k, v [B, H, T, d] (RoPE applied)."""
    T = q.shape[2]
    if window is None or window >= T - 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return windowed_attention(q, k, v, window, 0, 0, query_block)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, q_start: int, k_start: int,
                       query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """Sliding-window attention of queries at positions q_start + i over keys at k_start + j: a query
    sees the keys at its own position and the `window` before it, none at a position below 0 (context
    parallelism passes a previous block's tail whose first rank has none). FlexAttention on CUDA where
    `flex_runs`, the reference elsewhere."""
    if flex_runs(q):
        return flex(q, k, v, window_block_mask(window, q_start, k_start, q.shape[2], k.shape[2], q.device))
    return windowed_attention_reference(q, k, v, window, q_start, k_start, query_block)


def flex_runs(q: torch.Tensor) -> bool:
    """Whether FlexAttention runs: on CUDA, inside a compiled graph or with gradients (training: the shapes
    stay fixed, so it compiles once). Eager inference (prefill, generation, evaluation) takes the exact
    reference instead, because its prompts change length batch to batch and every new length would
    compile FlexAttention again."""
    return q.is_cuda and (torch.compiler.is_compiling() or torch.is_grad_enabled())


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention over `block_mask`: traced into the graph being compiled, or through its own compiled
    function when called eagerly (uncompiled FlexAttention materialises the scores)."""
    attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
    return attend(q, k, v, block_mask=block_mask)


@functools.lru_cache(maxsize=64)
def window_block_mask(window: int, q_start: int, k_start: int, q_len: int, kv_len: int, device: torch.device,
                      block: int = FLEX_BLOCK) -> BlockMask:
    """FlexAttention's block mask of windowed_attention: the key blocks each query block's window
    reaches, the partial ones masked per element. Built once per shape (under torch.compile the
    cache is traced through, and the mask becomes part of the compiled graph)."""
    def visible(b, h, q_idx, kv_idx):
        q_pos, k_pos = q_idx + q_start, kv_idx + k_start
        return (k_pos <= q_pos) & (q_pos - k_pos <= window) & (k_pos >= 0)

    return create_block_mask(visible, None, None, q_len, kv_len, device=device, BLOCK_SIZE=block)


def windowed_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, q_start: int,
                                 k_start: int, query_block: int = QUERY_BLOCK,
                                 documents: torch.Tensor | None = None) -> torch.Tensor:
    """windowed_attention in query blocks, each against only the keys its window reaches. `documents`
    [B, S]: the document id of every position of the rows (packed documents under context parallelism,
    where the queries and keys are a part of them); a query then sees only its own document's keys."""
    T = q.shape[2]
    outputs = []
    for lo in range(0, T, query_block):
        hi = min(lo + query_block, T)
        q_pos = torch.arange(q_start + lo, q_start + hi, device=q.device).unsqueeze(-1)
        first = max(0, q_start + lo - window - k_start)
        last = q_start + hi - k_start  # keys up to the block's last query
        k_pos = torch.arange(k_start + first, k_start + last, device=q.device)
        allowed = (k_pos <= q_pos) & (k_pos >= 0) & (q_pos - k_pos <= window)
        if documents is not None:
            same = documents[:, q_pos] == documents[:, k_pos.clamp(min=0)].unsqueeze(1)  # [B, queries, keys]
            allowed = (allowed & same).unsqueeze(1)
        outputs.append(F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, first:last], v[:, :, first:last],
                                                      attn_mask=allowed))
    return torch.cat(outputs, dim=2)
