"""torch.autograd wrapper of the fused RAT sequence-mixing kernels."""
import torch

from kernels.rat_bwd import rat_backward
from kernels.rat_fwd import rat_forward


class RATMixingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float):
        y, lse, ks, vs = rat_forward(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base)
        ctx.save_for_backward(q, k, v, f, gate_bias, y, lse, ks, vs)
        ctx.config = (chunk_size, head_dim, rope_base)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, f, gate_bias, y, lse, ks, vs = ctx.saved_tensors
        dq, dk, dv, df, dbias = rat_backward(dy, q, k, v, f, gate_bias, y, lse, ks, vs, *ctx.config)
        return dq, dk, dv, df, dbias, None, None, None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rat_mixing(q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float) -> torch.Tensor:
    """Fused RAT sequence mixing (same contract as ratpt.ops.rat_mixing_reference)."""
    q, k, v, f = (_last_dim_contiguous(t) for t in (q, k, v, f))
    return RATMixingFunction.apply(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base)


def rat_mixing_with_summaries(q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float):
    """Forward only (no autograd): y and the chunk summaries (rotated k̃, ṽ) [B, H, T//L, d]."""
    q, k, v, f = (_last_dim_contiguous(t) for t in (q, k, v, f))
    y, _, ks, vs = rat_forward(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base)
    return y, ks, vs
