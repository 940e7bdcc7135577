"""The sequence-mixing math of RAT-family models in plain PyTorch (arXiv 2507.04416).

This file travels inside every exported Hugging Face folder, where ratpt is not installed, so it
restates ratpt's reference ops (ratpt/ops) operation for operation: the same dtypes (gates and
scores in fp32, recurrent states in the input dtype) and the same order of floating-point steps,
so that the exported model gives ratpt's logits.

    g = sigmoid(f + gate_bias)                               (fp32)
    k̃, ṽ = gated recurrences of k, v inside each chunk of L tokens
    q, k̃ rotated by the chunk index; each token attends with one softmax over the earlier chunks'
    final (k̃, ṽ) (the chunk summaries) and its own (k̃, ṽ)
"""
import math

import torch
import torch.nn.functional as F

SCAN_BLOCK = 16  # positions per block of the hierarchical scan
QUERY_BLOCK = 512  # queries per block of the summary and sliding-window attention (bounds memory)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos, sin [*positions.shape, head_dim] of the half-split RoPE; angles in >= fp32."""
    angle_dtype = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=angle_dtype) / head_dim))
    angles = positions.to(angle_dtype).unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, d]: the two halves of a head vector are the (real, imaginary) parts."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def forget_gate(f: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
    """g = sigmoid(f + gate_bias) in at least fp32."""
    dtype = torch.promote_types(torch.promote_types(f.dtype, gate_bias.dtype), torch.float32)
    return torch.sigmoid(f.to(dtype) + gate_bias.to(dtype))


def chunk_scan(x: torch.Tensor, g: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """y[t] = g[t]·y[t-1] + (1 - g[t])·x[t] over [B, T, D], restarted every chunk_size tokens
    (None: never, the RNN layer); computed in >= fp32, returned in x's dtype."""
    compute = torch.promote_types(torch.promote_types(x.dtype, g.dtype), torch.float32)
    g = g.to(compute)
    u = (1 - g) * x.to(compute)
    if chunk_size is None or chunk_size >= x.shape[1]:
        return linear_scan(g, u).to(x.dtype)
    B, T, D = x.shape
    pad = -T % chunk_size
    g, u = (F.pad(t, (0, 0, 0, pad)) for t in (g, u))
    n_chunks = (T + pad) // chunk_size
    y = linear_scan(g.view(B * n_chunks, chunk_size, D), u.view(B * n_chunks, chunk_size, D))
    return y.view(B, T + pad, D)[:, :T].to(x.dtype)


def linear_scan(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """y[t] = a[t]·y[t-1] + u[t] along dim 1 of [B, T, D]: blocks of SCAN_BLOCK positions scanned side by
    side, the state between blocks itself a scan over the block ends, so the loop is short for any T."""
    B, T, D = u.shape
    if T <= SCAN_BLOCK:
        return _scan_rows(a, u)
    pad = -T % SCAN_BLOCK
    a, u = (F.pad(t, (0, 0, 0, pad)) for t in (a, u))
    n_blocks = (T + pad) // SCAN_BLOCK
    a, u = a.reshape(B, n_blocks, SCAN_BLOCK, D), u.reshape(B, n_blocks, SCAN_BLOCK, D)
    local = _scan_rows(a.flatten(0, 1), u.flatten(0, 1)).view(B, n_blocks, SCAN_BLOCK, D)
    decay = torch.cumprod(a, dim=2)
    ends = linear_scan(decay[:, :, -1], local[:, :, -1])
    carry_in = F.pad(ends[:, :-1], (0, 0, 1, 0))
    y = local + decay * carry_in.unsqueeze(2)
    return y.reshape(B, T + pad, D)[:, :T]


def _scan_rows(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    a_rows, u_rows = a.unbind(1), u.unbind(1)
    y = [u_rows[0]]
    for s in range(1, len(u_rows)):
        y.append(a_rows[s] * y[-1] + u_rows[s])
    return torch.stack(y, 1)


def attend_summaries(q, k_own, v_own, summaries_k, summaries_v, query_chunk: torch.Tensor) -> torch.Tensor:
    """One softmax over the summaries j < query_chunk and the own (k, v); q, k_own, v_own [B, H, Q, d],
    summaries [B, H, n, d], query_chunk [B or 1, Q]. The full forward's op and the decode step's."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    n = summaries_k.shape[2]
    visible = torch.arange(n, device=q.device) < query_chunk.unsqueeze(-1)
    score_dtype = torch.promote_types(q.dtype, torch.float32)
    inter = torch.matmul(q, summaries_k.transpose(-1, -2)).to(score_dtype)
    own = (q.to(score_dtype) * k_own.to(score_dtype)).sum(-1, keepdim=True)
    inter = inter.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = torch.softmax(torch.cat((inter, own), dim=-1) * scale, dim=-1).to(v_own.dtype)
    return torch.matmul(probs[..., :n], summaries_v) + probs[..., n:] * v_own


def summary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Every token's attention over the earlier chunks' final (k, v) and its own; all [B, H, T, d], k rotated.
    Queries go in blocks of whole chunks, so memory stays O(T · block)."""
    T, L = q.shape[2], chunk_size
    summaries_k, summaries_v = k[:, :, L - 1::L], v[:, :, L - 1::L]
    block = L * max(1, QUERY_BLOCK // L)
    chunk_of = torch.arange(T, device=q.device) // L
    outputs = []
    for start in range(0, T, block):
        stop = min(start + block, T)
        n_visible = (stop - 1) // L
        outputs.append(attend_summaries(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
                                        summaries_k[:, :, :n_visible], summaries_v[:, :, :n_visible],
                                        chunk_of[start:stop].unsqueeze(0)))
    return torch.cat(outputs, dim=2)


def rat_states(k, v, f, gate_bias, chunk_size: int, head_dim: int):
    """(g, k̃, ṽ): the fp32 gate and the in-chunk recurrences [B, T, H·d] of k (tiled from G groups to H
    heads: head h uses group h mod G) and v, in v's dtype."""
    H, G = v.shape[-1] // head_dim, k.shape[-1] // head_dim
    g = forget_gate(f, gate_bias)
    return g, chunk_scan(k.repeat(1, 1, H // G), g, chunk_size), chunk_scan(v, g, chunk_size)


def rat_attend_states(q, k_state, v_state, chunk_size: int, head_dim: int, rope_base: float) -> torch.Tensor:
    """y [B, T, H·d]: q (tiled to H heads) and k̃ rotated by the chunk index, then summary_attention."""
    B, T, D = v_state.shape
    H, G = D // head_dim, q.shape[-1] // head_dim
    cos, sin = rope_cos_sin(torch.arange(T, device=v_state.device) // chunk_size, head_dim, rope_base, v_state.dtype)

    def heads(t):
        return t.reshape(B, T, H, head_dim).transpose(1, 2)

    y = summary_attention(apply_rope(heads(q.repeat(1, 1, H // G)), cos, sin), apply_rope(heads(k_state), cos, sin),
                          heads(v_state), chunk_size)
    return y.transpose(1, 2).reshape(B, T, D)


def rat_prefill(q, k, v, f, gate_bias, lengths: torch.Tensor, chunk_size: int, head_dim: int, rope_base: float):
    """(y, summaries k̃ and ṽ [B, H, T // L, d] of the complete chunks, k̃ rotated by its chunk index, running k̃
    and ṽ [B, H·d] at each prompt's last token, fp32) for right-padded prompts of `lengths` [B]: the full
    forward and the cache that decode continues from."""
    B, T, D = v.shape
    H, L = D // head_dim, chunk_size
    g, k_state, v_state = rat_states(k, v, f, gate_bias, L, head_dim)
    y = rat_attend_states(q, k_state, v_state, L, head_dim, rope_base)
    ends = torch.arange(T // L, device=v.device) * L + L - 1  # complete chunks
    cos, sin = rope_cos_sin(ends // L, head_dim, rope_base, v.dtype)

    def heads(t):
        return t.reshape(B, -1, H, head_dim).transpose(1, 2)

    rows, last = torch.arange(B, device=v.device), lengths - 1
    return (y, apply_rope(heads(k_state[:, ends]), cos, sin), heads(v_state[:, ends]).contiguous(),
            k_state[rows, last].to(g.dtype), v_state[rows, last].to(g.dtype))


def rat_decode(q, k, v, f, gate_bias, summary_k, summary_v, running_k, running_v, positions: torch.Tensor,
               chunk_size: int, head_dim: int, rope_base: float) -> torch.Tensor:
    """One token per sequence at `positions` [B]: q, k [B, G·d], v, f [B, H·d]; returns y [B, H·d].

    Updates in place the fp32 running states [B, H·d] (reset at a chunk start) and slot c = position // L
    of the summaries [B, H, slots, d] (rotated k̃, ṽ): the current chunk's slot always holds its latest
    state, and a query sees slots j < c only, so a slot is read once its chunk is complete.
    """
    B, D = v.shape
    H, G = D // head_dim, q.shape[-1] // head_dim
    g = forget_gate(f, gate_bias)
    carry = (positions % chunk_size != 0).unsqueeze(-1)
    tiled_k = k.repeat(1, H // G).to(g.dtype)
    running_v.copy_(torch.where(carry, g * running_v, 0) + (1 - g) * v.to(g.dtype))
    running_k.copy_(torch.where(carry, g * running_k, 0) + (1 - g) * tiled_k)

    def heads(t):
        return t.to(v.dtype).view(B, H, 1, head_dim)

    chunk = positions // chunk_size
    cos, sin = rope_cos_sin(chunk.view(B, 1, 1), head_dim, rope_base, v.dtype)
    q_rot = apply_rope(heads(q.repeat(1, H // G)), cos, sin)
    k_rot = apply_rope(heads(running_k), cos, sin)
    v_own = heads(running_v)
    y = attend_summaries(q_rot, k_rot, v_own, summary_k, summary_v, chunk.unsqueeze(-1))
    slot = chunk.view(B, 1, 1, 1).expand(B, H, 1, head_dim)
    summary_k.scatter_(2, slot, k_rot.to(summary_k.dtype))
    summary_v.scatter_(2, slot, v_own.to(summary_v.dtype))
    return y.reshape(B, D).to(v.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d) v over the causal keys, or over the token and its `window` predecessors; [B, H, T, d]."""
    T = q.shape[2]
    if window is None or window >= T - 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    outputs = []
    for start in range(0, T, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, T)
        key_start = max(0, start - window)
        query_pos = torch.arange(start, stop, device=q.device).unsqueeze(-1)
        key_pos = torch.arange(key_start, stop, device=q.device)
        allowed = (key_pos <= query_pos) & (query_pos - key_pos <= window)
        outputs.append(F.scaled_dot_product_attention(q[:, :, start:stop], k[:, :, key_start:stop],
                                                      v[:, :, key_start:stop], attn_mask=allowed))
    return torch.cat(outputs, dim=2)
