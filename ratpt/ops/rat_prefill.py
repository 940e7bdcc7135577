"""RAT's prefill as one op: the sequence mixing of a right-padded prompt batch and the decode cache.

    y                     as rat_mixing
    Ks, Vs [B, H, T//L, d] the states k̃, ṽ at every complete chunk's end, k̃ rotated by its chunk
                          index (the summary slots decode reads)
    running k̃, ṽ [B, H·d] the states at each sequence's last prompt token (fp32, not rotated)

The kernels' forward computes these states anyway (its fp32 scratch and its rotated summaries), so
its path only gathers the running states; the reference derives all three from one pair of
chunk scans. `kernels` dispatches like rat_mixing.
"""
import torch

from ratpt.ops.chunk_scan import forget_gate
from ratpt.ops.rat_mixing import attend_states, recurrent_states_reference, use_triton
from ratpt.ops.rope import apply_rope, rope_cos_sin


def rat_prefill_mixing(q, k, v, f, gate_bias, lengths: torch.Tensor, chunk_size: int, head_dim: int,
                       rope_base: float, kernels: str = "auto"):
    """(y, Ks, Vs, running k̃, running ṽ) for prompts of `lengths` [B] (>= 1) right-padded to T."""
    args = (q, k, v, f, gate_bias, lengths, chunk_size, head_dim, rope_base)
    if use_triton(kernels, v, chunk_size, head_dim):
        from ratpt_kernels import rat_prefill
        return rat_prefill(*args)
    return rat_prefill_reference(*args)


def rat_prefill_reference(q, k, v, f, gate_bias, lengths: torch.Tensor, chunk_size: int, head_dim: int,
                          rope_base: float):
    """Pure-PyTorch ground truth of rat_prefill_mixing."""
    B, T, D = v.shape
    H, L = D // head_dim, chunk_size
    g = forget_gate(f, gate_bias)
    k_state, v_state = recurrent_states_reference(k, v, g, L, head_dim)
    y = attend_states(q, k_state, v_state, L, head_dim, rope_base)
    ends = torch.arange(T // L, device=v.device) * L + L - 1  # complete chunks only
    cos, sin = rope_cos_sin(ends // L, head_dim, rope_base, v.dtype)

    def heads(t):
        return t.reshape(B, -1, H, head_dim).transpose(1, 2)

    rows, last = torch.arange(B, device=v.device), lengths - 1
    return (y, apply_rope(heads(k_state[:, ends]), cos, sin), heads(v_state[:, ends]).contiguous(),
            k_state[rows, last].to(g.dtype), v_state[rows, last].to(g.dtype))
