"""Rotary position embedding, half-split layout (as the RAT reference code).

The first and second halves of a head vector form the (real, imaginary) pairs:
rotate_half(x) = [-x2, x1], x' = x*cos + rotate_half(x)*sin, with frequencies
base^(-2i/d). RAT rotates by the chunk index (token // L); attention by the token index.
"""
import torch


def rope_tables(positions: torch.Tensor, head_dim: int, base: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim] for integer positions.

    Angles are formed in float32 (float64 if dtype is float64) and then cast to dtype. Traceable, so
    that torch.compile fuses the tables into the rotation where they are as large as q itself (a
    decode step: one position per sequence); rope_cos_sin is the same math as one opaque op.
    """
    angle_dtype = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=angle_dtype) / head_dim))
    angles = positions.to(angle_dtype).unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@torch.library.custom_op("ratpt::rope_cos_sin", mutates_args=())
def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_tables as an opaque op, so that torch.compile materialises the tables once per call: inlined
    over a training sequence, its pow, cos and sin were recomputed for every element of q and k, a sixth
    of attention-1.3B's compiled training step."""
    return rope_tables(positions, head_dim, base, dtype)


@rope_cos_sin.register_fake
def _(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*positions.shape, head_dim)
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, d] by cos/sin broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
