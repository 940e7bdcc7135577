"""A decode step's linear layer with the RMSNorm before it, the activation after it and the residual add
as one op: y = act(RMSNorm(x) Wᵀ) + residual, each part optional.

At the few rows of a small-batch decode step each part is its own kernel launch that moves a few KB
beside the weight read; the Triton kernel (kernels/decode_linear.py) does all of them in one. The
reference composes the model's own ops (cuBLAS on CUDA), so it computes exactly what the modules do.
`kernels`: "triton" runs the kernel at up to ratpt_kernels.decode_linear.FMA_ROWS rows (its FMA path),
the reference above; "auto" and "torch" the reference. Measured on an H100 (benchmarks/profile_decode.py
--sweep-linear, kernels/NOTES.md): at one row the kernel takes 46 µs for a RAT-1.3B layer's four linears
against 76 for cuBLAS with its neighbours; at 64 rows its tensor-core tile made the whole compiled step
slower than cuBLAS (3.41 against 2.79 ms; 3.66 against 2.54 with the tile only on the weights no deeper
than wide, 3.08 launched plainly, though alone each of those ran 10-30% faster than cuBLAS), so larger
batches stay on the reference. "auto" stays on the
reference until a whole decode step is measured faster with the kernel.
"""
import torch
import torch.nn.functional as F

from ratpt.ops.rat_mixing import use_triton
from ratpt_kernels.decode_linear import FMA_ROWS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight, the mean of squares in >= fp32 even under bf16 (a drifting norm
    is hard to debug), the result in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight.to(x.dtype)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """none; gelu (exact); swiglu: h packs (gate, up) halves, silu(gate) ⊙ up."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return h


def decode_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, activation: str = "none", residual: torch.Tensor | None = None,
                  kernels: str = "auto") -> torch.Tensor:
    """act(RMSNorm(x) Wᵀ) + residual for x [..., K] and W [N, K] (nn.Linear's weight): the norm with
    `norm_weight` and `eps` if given, `activation` one of none | gelu | swiglu, `residual` [..., N] if
    given. Returns [..., N] (N/2 for swiglu) in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    fused = kernels == "triton" and use_triton(kernels, x, 1, 32)  # chunk 1, d 32: a shape-free check
    if fused and rows.shape[0] <= FMA_ROWS:
        from ratpt_kernels import decode_linear as triton_decode_linear
        flat_residual = None if residual is None else residual.reshape(rows.shape[0], -1)
        y = triton_decode_linear(rows, weight, norm_weight, eps, activation, flat_residual)
        return y.view(*x.shape[:-1], y.shape[-1])
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    y = activate(F.linear(x, weight), activation)
    return y if residual is None else residual + y
