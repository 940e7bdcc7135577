"""RAT's whole sequence mixing, output gate included, as one op, and the dispatch between its implementations.

    z, v, f, q, k = the column slices of the layer's input projection
    g = sigmoid(f + gate_bias) (fp32);  q, k tiled from G groups to H heads (head h: group h mod G)
    k̃, ṽ = chunk_scan(k, g), chunk_scan(v, g);  q, k̃ rotated by the chunk index
    y = inter_chunk_attention(q, k̃, ṽ)                     -> [B, T, H·d]
    out = sigmoid(z) ⊙ y

The input is the projection [B, T, 3·H·d + 2·G·d] (split_projection): the fused kernels then write its
gradient in place. The reference composes the readable ops of this package (rat_mixing_reference is
the ungated part on q, k, v, f); the Triton kernels (kernels/, imported as ratpt_kernels) fuse all of it (see kernels/NOTES.md).
`kernels`: "auto" = Triton on CUDA where the shape is supported, the reference elsewhere; "torch" =
always the reference; "triton" = always the kernels.

Over packed documents (`documents`, their chunk table ratpt.ops.documents.DocumentChunks) the kernels read the
tokens of each chunk in place; the reference lays the documents out padded to whole chunks, runs on that and
takes the tokens' slots back (the gradient flows through both copies).
"""
import torch

from ratpt.ops.chunk_scan import chunk_scan, forget_gate
from ratpt.ops.documents import DocumentChunks
from ratpt.ops.inter_chunk_attention import inter_chunk_attention
from ratpt.ops.rope import apply_rope, rope_cos_sin
from ratpt_kernels.autograd import split_projection
from ratpt_kernels.common import interpreting

BACKENDS = ("auto", "torch", "triton")


def rat_mixing(proj, gate_bias, chunk_size: int, head_dim: int, ngroups: int, rope_base: float,
               kernels: str = "auto", documents: DocumentChunks | None = None) -> torch.Tensor:
    """sigmoid(z) ⊙ y [B, T, H·d] from the input projection, by the implementation `kernels` picks;
    `documents`: the chunks of the packed documents (None: one document per row)."""
    if use_triton(kernels, proj, chunk_size, head_dim):
        from ratpt_kernels import rat_mixing as triton_rat_mixing
        if documents is None:
            return triton_rat_mixing(proj, gate_bias, chunk_size, head_dim, ngroups, rope_base)
        return triton_rat_mixing(proj, gate_bias, chunk_size, head_dim, ngroups, rope_base, documents.first_chunk,
                                 documents.start)
    z, v, f, q, k = split_projection(proj, head_dim, ngroups)
    return torch.sigmoid(z) * rat_mixing_reference(q, k, v, f, gate_bias, chunk_size, head_dim, rope_base, documents)


def use_triton(kernels: str, x: torch.Tensor, chunk_size: int, head_dim: int) -> bool:
    """Whether `kernels` selects the Triton path for this tensor and shape."""
    if kernels not in BACKENDS:
        raise ValueError(f"kernels must be one of {BACKENDS}, got {kernels!r}")
    if kernels == "torch":
        return False
    from ratpt_kernels import supports
    if kernels == "triton":
        if not supports(chunk_size, head_dim):
            raise ValueError(f"the Triton kernels need chunk_size a power of two <= 128 and head_dim in "
                             f"(32, 64, 128); got chunk_size={chunk_size}, head_dim={head_dim}")
        if not x.is_cuda and not interpreting():
            raise ValueError("model.kernels=triton runs the Triton kernels, which need the tensors on a CUDA GPU "
                             f"(these are on {x.device}; TRITON_INTERPRET=1 runs them in the Triton interpreter, "
                             "slowly): use model.kernels=auto or torch")
        return True
    return x.is_cuda and x.dtype != torch.float64 and supports(chunk_size, head_dim)


def rat_mixing_reference(q, k, v, f, gate_bias, chunk_size: int, head_dim: int,
                         rope_base: float, documents: DocumentChunks | None = None) -> torch.Tensor:
    """Pure-PyTorch ground truth of rat_mixing (the steps of docs/design.md#the-rat-layer, composed). Over
    packed `documents` the same steps run with every document padded to whole chunks (DocumentChunks.pad)."""
    first_chunk = None
    if documents is not None:
        q, k, v, f = (documents.pad(t) for t in (q, k, v, f))
        first_chunk = documents.slot_first_chunk()
    k_state, v_state = recurrent_states_reference(k, v, forget_gate(f, gate_bias), chunk_size, head_dim)
    y = attend_states(q, k_state, v_state, chunk_size, head_dim, rope_base, first_chunk)
    return y if documents is None else documents.unpad(y)


def recurrent_states_reference(k, v, g, chunk_size: int, head_dim: int):
    """k̃, ṽ [B, T, H·d] (input dtype): the in-chunk recurrences of k (tiled from G groups to H heads)
    and v under the gate g (ops.forget_gate)."""
    H, G = v.shape[-1] // head_dim, k.shape[-1] // head_dim
    return chunk_scan(k.repeat(1, 1, H // G), g, chunk_size), chunk_scan(v, g, chunk_size)


def attend_states(q, k_state, v_state, chunk_size: int, head_dim: int, rope_base: float,
                  first_chunk: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, T, H·d]: q (tiled to H heads) and k̃ rotated by the chunk index, each token's softmax over the
    earlier chunks' final states and its own. With `first_chunk` [B, T] (packed documents padded to whole
    chunks) the chunk index and the summaries are those of the token's own document."""
    B, T, D = v_state.shape
    H, G = D // head_dim, q.shape[-1] // head_dim
    chunk = torch.arange(T, device=v_state.device) // chunk_size
    if first_chunk is not None:
        chunk = (chunk - first_chunk).unsqueeze(1)  # [B, 1, T]: broadcast over the heads
    cos, sin = rope_cos_sin(chunk, head_dim, rope_base, v_state.dtype)

    def heads(t):
        return t.reshape(B, T, H, head_dim).transpose(1, 2)

    y = inter_chunk_attention(apply_rope(heads(q.repeat(1, 1, H // G)), cos, sin),
                              apply_rope(heads(k_state), cos, sin), heads(v_state), chunk_size,
                              first_chunk=first_chunk)
    return y.transpose(1, 2).reshape(B, T, D)
