"""The fused RAT sequence-mixing kernels as differentiable torch.library custom ops.

Registered as custom ops (forward and backward each one op, with fake implementations for
tracing) so that torch.compile keeps them as opaque calls inside a whole compiled block: no
graph break around the mixing, and inductor fuses the glue on both sides without ever
retracing the Triton kernels (it would retype their float arguments).
"""
import torch

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
def _backward(dy: Tensor, q: Tensor, k: Tensor, v: Tensor, f: Tensor, gate_bias: Tensor, y: Tensor, lse: Tensor,
              ks: Tensor, vs: Tensor, chunk_size: int, head_dim: int,
              rope_base: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, df, dgate_bias: kernels.rat_bwd.rat_backward."""
    return rat_backward(dy, q, k, v, f, gate_bias, y, lse, ks, vs, chunk_size, head_dim, rope_base)


@_backward.register_fake
def _backward_shapes(dy, q, k, v, f, gate_bias, *rest):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(f),
            torch.empty_like(gate_bias))


def _save(ctx, inputs, output) -> None:
    q, k, v, f, gate_bias, chunk_size, head_dim, rope_base = inputs
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs only the backward uses
    ctx.save_for_backward(q, k, v, f, gate_bias, *output)
    ctx.config = (chunk_size, head_dim, rope_base)


def _gradients(ctx, dy, *unused):  # lse and the summaries are saved for the backward, not returned to users
    grads = _backward(dy, *ctx.saved_tensors, *ctx.config)
    return (*grads, None, None, None)


_forward.register_autograd(_gradients, setup_context=_save)


def rat_mixing(q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float) -> Tensor:
    """Fused RAT sequence mixing (same contract as ratpt.ops.rat_mixing_reference)."""
    q, k, v, f = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, f))
    return _forward(q, k, v, f, gate_bias, chunk_size, head_dim, float(rope_base))[0]
