"""The fused RAT sequence-mixing kernels as differentiable torch.library custom ops.

Registered as custom ops (forward and backward each one op, with fake implementations for
tracing) so that torch.compile keeps them as opaque calls inside a whole compiled block: no
graph break around the mixing, and inductor fuses the glue on both sides without ever
retracing the Triton kernels (it would retype their float arguments).

The op takes the layer's whole input projection and applies its output gate sigmoid(z): the
kernels then write the projection's gradient directly, column slice by column slice, instead of
returning five gradients that autograd concatenates, and neither sigmoid(z) nor the ungated
output is kept for the backward (Δ = Σ dy·y holds for the gated pair as well).
"""
import torch

from .rat_bwd import rat_backward
from .rat_fwd import check_documents, rat_forward

Tensor = torch.Tensor


def split_projection(proj: Tensor, head_dim: int, ngroups: int) -> tuple[Tensor, ...]:
    """z, v, f [B, T, H·d] and q, k [B, T, G·d]: the column slices of the RAT layer's input projection
    [B, T, 3·H·d + 2·G·d] (z before its sigmoid, f before the gate's)."""
    qk = ngroups * head_dim
    D = (proj.shape[-1] - 2 * qk) // 3
    return proj.split([D, D, D, qk, qk], dim=-1)


@torch.library.custom_op("ratpt::rat_mixing_forward", mutates_args=())
def _forward(proj: Tensor, gate_bias: Tensor, chunk_size: int, head_dim: int, ngroups: int,
             rope_base: float, first_chunk: Tensor | None = None, chunk_start: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sigmoid(z) ⊙ y, lse (base 2), Ks, Vs: ratpt_kernels.rat_fwd.rat_forward with the output gate."""
    z, v, f, q, k = split_projection(proj, head_dim, ngroups)
    return rat_forward(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base, gate=z,
                       documents=_documents(first_chunk, chunk_start))


@_forward.register_fake
def _forward_shapes(proj, gate_bias, chunk_size, head_dim, ngroups, rope_base, first_chunk=None, chunk_start=None):
    B, T, P = proj.shape
    D = (P - 2 * ngroups * head_dim) // 3
    S = T if first_chunk is None else first_chunk.shape[1] * chunk_size  # rat_fwd.slots
    summaries = proj.new_empty(B, D // head_dim, S // chunk_size, head_dim)
    return (proj.new_empty(B, T, D), proj.new_empty(B, D // head_dim, S, dtype=torch.float32), summaries,
            torch.empty_like(summaries))


@torch.library.custom_op("ratpt::rat_mixing_backward", mutates_args=())
def _backward(dout: Tensor, proj: Tensor, gate_bias: Tensor, out: Tensor, lse: Tensor, ks: Tensor, vs: Tensor,
              chunk_size: int, head_dim: int, ngroups: int, rope_base: float,
              first_chunk: Tensor | None = None, chunk_start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The projection's gradient (every column slice written in place by the kernels, so nothing
    concatenates them) and the gate bias's: ratpt_kernels.rat_bwd.rat_backward with the output gate."""
    z, v, f, q, k = split_projection(proj, head_dim, ngroups)
    dproj = torch.empty_like(proj)
    dz, dv, df, dq, dk = split_projection(dproj, head_dim, ngroups)
    *_, dbias = rat_backward(dout, q, k, v, f, gate_bias, out, lse, ks, vs, chunk_size, head_dim, rope_base,
                             gate=(z, dz), out=(dq, dk, dv, df),
                             documents=_documents(first_chunk, chunk_start))
    return dproj, dbias


@_backward.register_fake
def _backward_shapes(dout, proj, gate_bias, *rest):
    return torch.empty_like(proj), torch.empty_like(gate_bias)


def _save(ctx, inputs, output) -> None:
    proj, gate_bias, chunk_size, head_dim, ngroups, rope_base, first_chunk, chunk_start = inputs
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs only the backward uses
    ctx.save_for_backward(proj, gate_bias, *output, first_chunk, chunk_start)
    ctx.config = (chunk_size, head_dim, ngroups, rope_base)


def _gradients(ctx, dout, *unused):  # lse and the summaries are saved for the backward, not returned to users
    *saved, first_chunk, chunk_start = ctx.saved_tensors
    return (*_backward(dout, *saved, *ctx.config, first_chunk, chunk_start), None, None, None, None, None, None)


def _documents(first_chunk: Tensor | None, chunk_start: Tensor | None):
    """The kernels' packed documents (rat_fwd.rat_states) from the op's two optional tensors."""
    return None if first_chunk is None else (first_chunk, chunk_start)


_forward.register_autograd(_gradients, setup_context=_save)


def rat_mixing(proj, gate_bias, chunk_size: int, head_dim: int, ngroups: int, rope_base: float,
               first_chunk: Tensor | None = None, chunk_start: Tensor | None = None) -> Tensor:
    """Fused RAT sequence mixing with its output gate (same contract as ratpt.ops.rat_mixing). Packed documents
    come as their chunk table (ratpt.ops.documents.DocumentChunks), first_chunk and chunk_start [B, C] (int32):
    for each chunk, the chunk its document starts at and its first token; the kernels read the projection and
    write the output and its gradient in place, in tokens."""
    proj = proj if proj.stride(-1) == 1 else proj.contiguous()
    if first_chunk is not None:
        first_chunk, chunk_start = check_documents((first_chunk, chunk_start), chunk_size)
    return _forward(proj, gate_bias, chunk_size, head_dim, ngroups, float(rope_base), first_chunk, chunk_start)[0]
