"""RAT's softmax over chunk summaries plus the token's own state, the "A" of RAT
(docs/design.md#softmax-over-chunk-summaries).

For token (c, l) of one head:
    keys   = [k̃[0,L-1], ..., k̃[c-1,L-1], k̃[c,l]]      values likewise from ṽ
    y[c,l] = softmax(q[c,l] · keysᵀ · scale) · values

Queries are processed in blocks of whole chunks. A block sees only the summaries of chunks
before its last chunk, and each block runs under activation checkpointing when gradients are
needed, so memory is O(T·block) rather than O(T·T/L): a 100K-token sequence fits. The
summaries and own state are merged in one softmax (the own score is an extra column), which
is exact and never has an empty row. Over packed documents (`first_chunk`), a token sees only the
summaries of its own document's earlier chunks.
"""
import math

import torch
from torch.utils.checkpoint import checkpoint

QUERY_BLOCK = 512  # target queries per block (rounded to whole chunks)


def inter_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                          query_block: int = QUERY_BLOCK, first_chunk: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q over earlier chunks' final (k, v) and the own (k, v); all [B, H, T, d].

    k and v are the recurrent states k̃, ṽ (k̃ already rotated); the output is [B, H, T, d]. `first_chunk`
    [B, T] (packed documents, ratpt.ops.documents.DocumentChunks): the chunk each token's document starts
    at; the summaries before it are hidden.
    """
    T = q.shape[2]
    L = chunk_size
    summaries_k = k[:, :, L - 1::L]
    summaries_v = v[:, :, L - 1::L]
    block = L * max(1, query_block // L)
    chunk_of = torch.arange(T, device=q.device) // L
    outputs = []
    for start in range(0, T, block):
        stop = min(start + block, T)
        n_visible = (stop - 1) // L  # summaries of chunks before the block's last chunk (no .item(): compilable)
        args = (q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
                summaries_k[:, :, :n_visible], summaries_v[:, :, :n_visible],
                chunk_of[start:stop].unsqueeze(0), None if first_chunk is None else first_chunk[:, start:stop])
        if torch.is_grad_enabled():
            outputs.append(checkpoint(attend_summaries, *args, use_reentrant=False))
        else:
            outputs.append(attend_summaries(*args))
    return torch.cat(outputs, dim=2)


def attend_summaries(q: torch.Tensor, k_own: torch.Tensor, v_own: torch.Tensor,
                     summaries_k: torch.Tensor, summaries_v: torch.Tensor,
                     query_chunk: torch.Tensor, first_chunk: torch.Tensor | None = None) -> torch.Tensor:
    """One softmax over summaries j < query_chunk and the own (k, v).

    q, k_own, v_own: [B, H, Q, d]; summaries: [B, H, n, d]; query_chunk: [B or 1, Q], the chunk
    index of each query (summary j is visible iff j < query_chunk, and j >= first_chunk [B, Q] when
    given: the query's document starts there). Also the decode step's op.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    n = summaries_k.shape[2]
    summary = torch.arange(n, device=q.device)
    visible = summary < query_chunk.unsqueeze(-1)  # [B|1, Q, n]
    if first_chunk is not None:
        visible = visible & (summary >= first_chunk.unsqueeze(-1))
    score_dtype = torch.promote_types(q.dtype, torch.float32)
    inter = torch.matmul(q, summaries_k.transpose(-1, -2)).to(score_dtype)
    own = (q.to(score_dtype) * k_own.to(score_dtype)).sum(-1, keepdim=True)
    inter = inter.masked_fill(~visible.unsqueeze(1), float("-inf"))
    scores = torch.cat((inter, own), dim=-1) * scale
    probs = torch.softmax(scores, dim=-1).to(v_own.dtype)
    return torch.matmul(probs[..., :n], summaries_v) + probs[..., n:] * v_own
