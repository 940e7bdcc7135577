"""The decode op (ratpt.ops.rat_decode_mixing): its reference against the full-sequence op, and
the Triton decode kernel against the reference.

1. Decoding a whole sequence token by token (float64, empty caches) gives, at position t, row t
   of rat_mixing_reference over the sequence: the recurrence reset, the chunk RoPE, the summary
   slots written at chunk ends and the visibility j < c all agree with the full op.
2. On CPU the kernel runs in the Triton interpreter (16-slot blocks), in fp32, on random caches
   with ragged positions per sequence: at and just after chunk starts, at chunk ends, past
   several slot blocks. Output, both summary caches and both running states are compared with a
   float64 evaluation of the reference on the same inputs. The kernel keeps everything in fp32
   (reductions over <= d products and <= 50 slots), so its error is ~1e-6 on these O(1) values;
   1e-4 leaves room without hiding a wrong term. Cut in runs of slots (the small-batch launch), the
   positions leave some runs empty: the merge must ignore them. The summary products run both as FMAs
   and as (IEEE fp32, in the interpreter) tensor-core dots of the query's 16-row tile.
"""
import pytest
import torch

from ratpt_kernels import rat_decode
from ratpt.ops import rat_decode_mixing, rat_mixing_reference

ROPE_BASE = 10000.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def token_inputs(B, T, H, G, d, dtype, seed=0):
    """q, k [B, T, G·d], v, f [B, T, H·d], gate_bias [H·d]."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, T, G * d), (B, T, G * d), (B, T, H * d), (B, T, H * d), (H * d,)]
    return [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("B,T,H,G,d,L", [(2, 23, 4, 2, 16, 4), (1, 12, 2, 1, 8, 1), (2, 9, 2, 2, 8, 16)],
                         ids=["L4-groups2-partial-chunk", "L1", "T-below-L"])
def test_reference_decode_token_by_token_equals_full_sequence(B, T, H, G, d, L):
    q, k, v, f, bias = token_inputs(B, T, H, G, d, torch.float64)
    want = rat_mixing_reference(q, k, v, f, bias, L, d, ROPE_BASE)
    capacity = -(-T // L)
    summary_k = torch.zeros(B, H, capacity, d, dtype=torch.float64)
    summary_v = torch.zeros_like(summary_k)
    running_k = torch.zeros(B, H * d, dtype=torch.float64)
    running_v = torch.zeros_like(running_k)
    for t in range(T):
        positions = torch.full((B,), t, dtype=torch.long)
        y = rat_decode_mixing(q[:, t], k[:, t], v[:, t], f[:, t], bias, summary_k, summary_v, running_k,
                              running_v, positions, L, d, ROPE_BASE, kernels="torch")
        torch.testing.assert_close(y, want[:, t], rtol=1e-10, atol=1e-10, msg=lambda m: f"position {t}: {m}")


def decode_state(B, H, G, d, capacity, dtype, device, seed=0):
    """One token's inputs and random caches (the state after some earlier tokens)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    tokens = [rand(B, G * d), rand(B, G * d), rand(B, H * d), rand(B, H * d), rand(H * d).float()]
    caches = [rand(B, H, capacity, d), rand(B, H, capacity, d), rand(B, H * d).float(), rand(B, H * d).float()]
    return tokens, caches


CASES = {  # name: (H, G, d, L, positions)
    "L4-d32-starts-and-ends": (2, 1, 32, 4, [0, 3, 4, 5, 131, 160]),
    "L16-d64-groups2": (4, 2, 64, 16, [16, 17, 31, 400, 815, 1]),
    "L8-d128-groups4": (4, 4, 128, 8, [7, 8, 9, 263, 264, 0]),
    "L1-d32": (2, 2, 32, 1, [0, 1, 16, 17, 33, 40]),
}


@pytest.mark.parametrize("dots", [False, True], ids=["fma", "dots"])
@pytest.mark.parametrize("splits", [1, 3], ids=["one-program", "slots-split-in-3"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_decode_equals_reference(case, splits, dots):
    H, G, d, L, positions = case
    B = len(positions)
    positions = torch.tensor(positions, device=DEVICE)
    capacity = int(positions.max()) // L + 3
    tokens, caches = decode_state(B, H, G, d, capacity, torch.float32, DEVICE)
    wide = [t.double() for t in caches]
    want = rat_decode_mixing(*(t.double() for t in tokens), *wide, positions, L, d, ROPE_BASE, kernels="torch")
    got = rat_decode(*tokens, *caches, positions, L, d, ROPE_BASE, splits=splits, dots=dots)
    for name, a, b in zip(["y", "summary_k", "summary_v", "running_k", "running_v"], [got, *caches], [want, *wide]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dots", [False, True], ids=["fma", "dots"])
@pytest.mark.parametrize("splits", [1, 2], ids=["one-program", "merged-from-2"])
def test_triton_decode_applies_the_output_gate(splits, dots):
    """With z given, the kernel returns sigmoid(z) ⊙ y (the reference's gated output) and updates the
    caches exactly as without it; split, the merge applies the gate."""
    H, G, d, L, positions = CASES["L16-d64-groups2"]
    B = len(positions)
    positions = torch.tensor(positions, device=DEVICE)
    tokens, caches = decode_state(B, H, G, d, int(positions.max()) // L + 3, torch.float32, DEVICE)
    projection = torch.randn(B, 3 * H * d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    z = projection[:, H * d:2 * H * d]  # a column slice, as in the layer's input projection
    wide = [t.double() for t in caches]
    want = rat_decode_mixing(*(t.double() for t in tokens), *wide, positions, L, d, ROPE_BASE, kernels="torch",
                             gate=z.double())
    got = rat_decode(*tokens, *caches, positions, L, d, ROPE_BASE, gate=z, splits=splits, dots=dots)
    for name, a, b in zip(["y", "summary_k", "summary_v", "running_k", "running_v"], [got, *caches], [want, *wide]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
