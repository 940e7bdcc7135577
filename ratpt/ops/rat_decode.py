"""RAT's decode step as one op: one new token per sequence against the chunk-summary cache.

For the token at position t = c·L + l of sequence b (docs/design.md#the-rat-layer, one row of rat_mixing):
    g = sigmoid(f + gate_bias) (fp32);  running (k̃, ṽ) = g·running + (1 − g)·(k, v), reset at l = 0
    y = softmax over [summary slots j < c, the own rotated running state]   (RoPE by chunk c)
    slot c of the summary cache := the rotated running k̃ and ṽ
The slot of the current chunk always holds its latest state; queries see it (j < c) only once
the chunk is complete, when it holds the chunk summary.

Static shapes, no host synchronisation and no Python branch on tensor values: the step can be
captured in a CUDA graph. The caches are updated in place; the caller keeps
capacity > positions // chunk_size. `kernels` dispatches like rat_mixing ("auto" = the Triton
decode kernel on CUDA).
"""
import torch

from ratpt.ops.chunk_scan import forget_gate
from ratpt.ops.inter_chunk_attention import attend_summaries
from ratpt.ops.rat_mixing import use_triton
from ratpt.ops.rope import apply_rope, rope_cos_sin


def rat_decode_mixing(q, k, v, f, gate_bias, summary_k, summary_v, running_k, running_v,
                      positions, chunk_size: int, head_dim: int, rope_base: float,
                      kernels: str = "auto", gate: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, H·d] (v.dtype) of this token; updates summary_k/v [B, H, capacity, d] and running_k/v [B, H·d].

    q, k [B, G·d] and v, f [B, H·d] are this token's column slices of the input projection
    (f before the sigmoid); positions [B] (int64) is this token's position (read only). With
    `gate` (z [B, H·d], the output gate before its sigmoid) the result is sigmoid(z) ⊙ y, in the
    kernel's epilogue rather than two more launches.
    """
    args = (q, k, v, f, gate_bias, summary_k, summary_v, running_k, running_v, positions,
            chunk_size, head_dim, rope_base, gate)
    if use_triton(kernels, v, chunk_size, head_dim):
        from ratpt_kernels import rat_decode
        return rat_decode(*args)
    return rat_decode_reference(*args)


def rat_decode_reference(q, k, v, f, gate_bias, summary_k, summary_v, running_k, running_v,
                         positions, chunk_size: int, head_dim: int, rope_base: float,
                         gate: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch ground truth of rat_decode_mixing (the math of RATMixer.decode)."""
    B, D = v.shape
    H, G = D // head_dim, q.shape[-1] // head_dim
    g = forget_gate(f, gate_bias)
    carry = (positions % chunk_size != 0).unsqueeze(-1)  # no carry at a chunk start
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
    y = y.reshape(B, D).to(v.dtype)
    return y if gate is None else torch.sigmoid(gate) * y
