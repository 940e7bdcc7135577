"""torch.autograd wrapper of the fused RAT sequence-mixing kernels."""
import torch

from kernels.common import LOG2E
from kernels.rat_bwd import rat_backward
from kernels.rat_fwd import rat_forward


class RATMixingFunction(torch.autograd.Function):
    """y with its softmax normaliser and chunk summaries as differentiable outputs, so that
    context parallelism can merge y with attention over other ranks' summaries; gradients of the
    outputs nobody used stay None (no zero tensors)."""

    @staticmethod
    def forward(ctx, q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float):
        y, lse, ks, vs = rat_forward(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, f, gate_bias, y, lse, ks, vs)
        ctx.config = (chunk_size, head_dim, rope_base)
        return y, lse / LOG2E, ks, vs

    @staticmethod
    def backward(ctx, dy, dlse, dks, dvs):
        q, k, v, f, gate_bias, y, lse, ks, vs = ctx.saved_tensors
        grads = rat_backward(dy, q, k, v, f, gate_bias, y, lse, ks, vs, *ctx.config, dlse=dlse, dks_extra=dks,
                             dvs_extra=dvs)
        return (*grads, None, None, None)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rat_mixing(q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float) -> torch.Tensor:
    """Fused RAT sequence mixing (same contract as ratpt.ops.rat_mixing_reference)."""
    return rat_mixing_parts(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base)[0]


def rat_mixing_parts(q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float):
    """y [B, T, H·d], its natural-log softmax normaliser lse [B, H, T] (fp32) and the chunk summaries
    Ks, Vs [B, H, T//L, d] (rotated by the chunk index), all differentiable."""
    q, k, v, f = (_last_dim_contiguous(t) for t in (q, k, v, f))
    return RATMixingFunction.apply(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base)
