"""The fused RAT sequence-mixing kernels as differentiable torch.library custom ops.

Registered as custom ops (forward and backward each one op, with fake implementations for
tracing) so that torch.compile keeps them as opaque calls inside a whole compiled block: no
graph break around the mixing, and inductor fuses the glue on both sides without ever
retracing the Triton kernels (it would retype their float arguments).
"""
import torch

from kernels.common import LOG2E
from kernels.rat_bwd import rat_backward
from kernels.rat_fwd import rat_forward

Tensor = torch.Tensor


@torch.library.custom_op("ratpt::rat_mixing_forward", mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, f: Tensor, gate_bias: Tensor, chunk_size: int, head_dim: int,
             rope_base: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, lse (base 2), Ks, Vs: kernels.rat_fwd.rat_forward."""
    return rat_forward(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base)


@_forward.register_fake
def _forward_shapes(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base):
    B, T, D = v.shape
    summaries = v.new_empty(B, D // head_dim, T // chunk_size, head_dim)
    return (v.new_empty(B, T, D), v.new_empty(B, D // head_dim, T, dtype=torch.float32), summaries,
            torch.empty_like(summaries))


@torch.library.custom_op("ratpt::rat_mixing_backward", mutates_args=())
def _backward(dy: Tensor, dlse: Tensor | None, dks: Tensor | None, dvs: Tensor | None, q: Tensor, k: Tensor,
              v: Tensor, f: Tensor, gate_bias: Tensor, y: Tensor, lse: Tensor, ks: Tensor, vs: Tensor,
              chunk_size: int, head_dim: int, rope_base: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, df, dgate_bias; dlse is the gradient of the base-2 lse (None: unused)."""
    return rat_backward(dy, q, k, v, f, gate_bias, y, lse, ks, vs, chunk_size, head_dim, rope_base,
                        dlse=None if dlse is None else dlse * LOG2E, dks_extra=dks, dvs_extra=dvs)


@_backward.register_fake
def _backward_shapes(dy, dlse, dks, dvs, q, k, v, f, gate_bias, *rest):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(f),
            torch.empty_like(gate_bias))


def _save(ctx, inputs, output) -> None:
    q, k, v, f, gate_bias, chunk_size, head_dim, rope_base = inputs
    ctx.set_materialize_grads(False)  # gradients of outputs nobody used stay None: no zero tensors
    ctx.save_for_backward(q, k, v, f, gate_bias, *output)
    ctx.config = (chunk_size, head_dim, rope_base)


def _gradients(ctx, dy, dlse, dks, dvs):
    q, k, v, f, gate_bias, y, lse, ks, vs = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    grads = _backward(dy, dlse, dks, dvs, q, k, v, f, gate_bias, y, lse, ks, vs, *ctx.config)
    return (*grads, None, None, None)


_forward.register_autograd(_gradients, setup_context=_save)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _apply(q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float):
    q, k, v, f = (_last_dim_contiguous(t) for t in (q, k, v, f))
    return _forward(q, k, v, f, gate_bias, chunk_size, head_dim, float(rope_base))


def rat_mixing(q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float) -> Tensor:
    """Fused RAT sequence mixing (same contract as ratpt.ops.rat_mixing_reference)."""
    return _apply(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base)[0]


def rat_mixing_parts(q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float):
    """y [B, T, H·d], its natural-log softmax normaliser lse [B, H, T] (fp32) and the chunk summaries
    Ks, Vs [B, H, T//L, d] (rotated by the chunk index), all differentiable."""
    y, lse2, ks, vs = _apply(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base)
    return y, lse2 / LOG2E, ks, vs
