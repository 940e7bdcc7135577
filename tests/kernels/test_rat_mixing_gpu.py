"""The Triton RAT mixing on the GPU in bf16 (and fp32), against the reference ops, up to T = 32K.

Tolerance, justified: the ground truth is the reference evaluated in fp32 on the same bf16
inputs. The bf16 reference itself rounds k̃, ṽ, the RoPE tables and the rotated keys to bf16,
so its own norm-wise relative error against that truth is a few 2^-8 (bf16 epsilon, 3.9e-3).
The kernel keeps recurrences, RoPE, scores and softmax in fp32 and rounds only the dot operands
and the outputs, so it must be at least as close: we require kernel error <= 2 x the bf16
reference's error + 2e-3, for the output and for every input gradient. fp32 inputs must match
the fp32 reference to 1e-4 relative (IEEE dots, fp32 everywhere: only summation order differs).
"""
import functools

import pytest
import torch

from ratpt_kernels import rat_mixing
from ratpt import ops
from ratpt.ops.documents import DocumentChunks

pytestmark = pytest.mark.gpu
NAMES = ["out", "dz", "dv", "df", "dq", "dk", "dgate_bias"]


def inputs(B, T, H, G, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, device="cuda", generator=gen).to(dt).requires_grad_()

    return [rand(B, T, G * d), rand(B, T, G * d), rand(B, T, H * d), rand(B, T, H * d),
            rand(H * d, dt=torch.float32)]


def projection_inputs(B, T, H, G, d, dtype, seed=0):
    """The layer's input projection (z, v, f, q, k) and the gate bias, as leaves."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    proj = torch.randn(B, T, 3 * H * d + 2 * G * d, device="cuda", generator=gen).to(dtype)
    return [proj.requires_grad_(), torch.randn(H * d, device="cuda", generator=gen).requires_grad_()]


def reference_mixing(proj, gate_bias, L, d, G, rope_base):
    return ops.rat_mixing(proj, gate_bias, L, d, G, rope_base, kernels="torch")


def run(fn, xs, w, L, d, G):
    out = fn(*xs, L, d, G, 10000.0)
    dproj, dbias = torch.autograd.grad((out.float() * w).sum(), xs)
    return [out.float(), *(g.float() for g in (*ops.split_projection(dproj, d, G), dbias))]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


GRID = {  # name: (B, T, H, G, d, L)
    "T32K-L16-d128-G2": (1, 32768, 4, 2, 128, 16),
    "T4K-L64-d64-G1": (2, 4096, 4, 1, 64, 64),
    "T1000-L8-d128-G2-partial": (2, 1000, 4, 2, 128, 8),
    "T8191-L128-d128-G4-partial": (1, 8191, 8, 4, 128, 128),
    "T2048-L32-d64-G2": (2, 2048, 4, 2, 64, 32),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"], indirect=True)
@pytest.mark.parametrize("shape", GRID.values(), ids=GRID.keys())
def test_bf16_kernel_is_as_close_to_fp32_truth_as_the_bf16_reference(shape, deterministic):
    B, T, H, G, d, L = shape
    xs = projection_inputs(B, T, H, G, d, torch.bfloat16)
    w = torch.randn(B, T, H * d, device="cuda")
    truth = run(reference_mixing, [x.detach().float().requires_grad_() for x in xs], w, L, d, G)
    ref = run(reference_mixing, xs, w, L, d, G)
    got = run(rat_mixing, xs, w, L, d, G)
    for name, a, r, t in zip(NAMES, got, ref, truth):
        err, ref_err = rel(a, t), rel(r, t)
        print(f"{name}: kernel {err:.2e}  bf16 reference {ref_err:.2e}")
        assert err <= 2 * ref_err + 2e-3, f"{name}: kernel error {err:.2e}, bf16 reference {ref_err:.2e}"


@pytest.mark.parametrize("L", [16, 128])
def test_fp32_kernel_matches_fp32_reference(L):
    B, T, H, G, d = 2, 777, 4, 2, 64
    xs = projection_inputs(B, T, H, G, d, torch.float32)
    w = torch.randn(B, T, H * d, device="cuda")
    for name, a, b in zip(NAMES, run(rat_mixing, xs, w, L, d, G), run(reference_mixing, xs, w, L, d, G)):
        assert rel(a, b) < 1e-4, f"{name}: {rel(a, b):.2e}"


def test_bf16_prefill_is_as_close_to_fp32_truth_as_the_bf16_reference():
    # the same criterion for the prefill's outputs: y, the rotated summaries and the running states
    from ratpt_kernels import rat_prefill
    from ratpt.ops import rat_prefill_reference

    xs = [t.detach() for t in inputs(3, 4096, 16, 2, 128, torch.bfloat16)]
    lengths = torch.tensor([4096, 2049, 17], device="cuda")
    truth = rat_prefill_reference(*(t.float() for t in xs), lengths, 16, 128, 10000.0)
    bf16 = rat_prefill_reference(*xs, lengths, 16, 128, 10000.0)
    got = rat_prefill(*xs, lengths, 16, 128, 10000.0)
    for name, g, r, t in zip(("y", "Ks", "Vs", "running k", "running v"), got, bf16, truth):
        assert rel(g.float(), t) <= 2 * rel(r.float(), t) + 2e-3, name


@pytest.mark.parametrize("deterministic", [True], ids=["deterministic"], indirect=True)
def test_deterministic_backward_is_bit_reproducible(deterministic):
    xs = projection_inputs(2, 8192, 16, 2, 128, torch.bfloat16)
    w = torch.randn(2, 8192, 16 * 128, device="cuda")
    first, second = run(rat_mixing, xs, w, 16, 128, 2), run(rat_mixing, xs, w, 16, 128, 2)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"], indirect=True)
def test_bf16_kernel_over_packed_documents_is_as_close_to_fp32_truth_as_the_bf16_reference(deterministic):
    # documents shorter than a chunk, of exactly one, of many chunks with a partial last one; the same criterion
    B, T, H, G, d, L = 2, 4096, 4, 2, 128, 16
    rows = [[5, 16, 700, 2000, 1375], [3000, 15, 1081]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows]).cuda()
    xs = projection_inputs(B, T, H, G, d, torch.bfloat16)
    w = torch.randn(B, T, H * d, device="cuda")
    documents = DocumentChunks.of(positions, L)
    reference = functools.partial(ops.rat_mixing, kernels="torch", documents=documents)
    truth = run(reference, [x.detach().float().requires_grad_() for x in xs], w, L, d, G)
    ref = run(reference, xs, w, L, d, G)
    got = run(functools.partial(ops.rat_mixing, kernels="triton", documents=documents), xs, w, L, d, G)
    for name, a, r, t in zip(NAMES, got, ref, truth):
        err, ref_err = rel(a, t), rel(r, t)
        assert err <= 2 * ref_err + 2e-3, f"{name}: kernel error {err:.2e}, bf16 reference {ref_err:.2e}"
