"""The fused Triton RAT mixing over packed documents against the float64 reference: output and every gradient.

On CPU the kernels run in the Triton interpreter (16-row query blocks, 16-summary blocks), in fp32. The rows pack
documents shorter than a chunk, of exactly one chunk, of several chunks and a partial one, and one that spans
several summary blocks, so that a query block starts past its first summaries and a summary block's rows end at
its document's end. Tolerance as in test_rat_mixing.py: fp32 reductions against float64, 1e-4.
"""
import pytest
import torch

from ratpt import ops
from ratpt.ops.documents import DocumentChunks

ROPE_BASE = 10000.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU machine the same tests run compiled
NAMES = ["out", "dz", "dv", "df", "dq", "dk", "dgate_bias"]


def packed_positions(rows: list[list[int]], device=DEVICE) -> torch.Tensor:
    """positions [B, T] of rows that pack documents of the given lengths (each row's lengths sum to T)."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows]).to(device)


def output_and_grads(proj, gate_bias, w, L, d, G, kernels, positions):
    documents = None if positions is None else DocumentChunks.of(positions, L)
    out = ops.rat_mixing(proj, gate_bias, L, d, G, ROPE_BASE, kernels=kernels, documents=documents)
    dproj, dbias = torch.autograd.grad((out * w).sum(), (proj, gate_bias))
    return [out, *ops.split_projection(dproj, d, G), dbias]


def projection(B, T, H, G, d, dtype=torch.float32, device=DEVICE):
    torch.manual_seed(0)
    proj = torch.randn(B, T, 3 * H * d + 2 * G * d, dtype=dtype, device=device).requires_grad_()
    bias = torch.randn(H * d, dtype=torch.float32, device=device).requires_grad_()
    return proj, bias, torch.randn(B, T, H * d, dtype=dtype, device=device)


CASES = {  # name: (H, G, d, L, documents of each row)
    "L8": (2, 1, 32, 8, [[3, 8, 21, 8], [17, 1, 22]]),
    "L4-many-summary-blocks": (4, 2, 32, 4, [[5, 4, 50, 1, 30], [61, 3, 26]]),
}


@pytest.mark.parametrize("case,deterministic", [("L8", False), ("L4-many-summary-blocks", False),
                                                ("L4-many-summary-blocks", True)],
                         ids=["L8", "L4-many-summary-blocks", "L4-many-summary-blocks-deterministic"],
                         indirect=["deterministic"])
def test_triton_mixing_over_packed_documents_equals_reference(case, deterministic):
    H, G, d, L, rows = CASES[case]
    positions = packed_positions(rows)
    proj, bias, w = projection(len(rows), positions.shape[1], H, G, d)
    got = output_and_grads(proj, bias, w, L, d, G, "triton", positions)
    wide = [t.detach().double().requires_grad_() for t in (proj, bias)]
    want = output_and_grads(*wide, w.double(), L, d, G, "torch", positions)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_one_document_per_row_on_the_masked_kernels_equals_the_unmasked_kernels_exactly():
    H, G, d, L, T = 2, 1, 32, 8, 40
    proj, bias, w = projection(2, T, H, G, d)
    positions = torch.arange(T, device=DEVICE).expand(2, -1)
    masked = output_and_grads(proj, bias, w, L, d, G, "triton", positions)
    unmasked = output_and_grads(proj, bias, w, L, d, G, "triton", None)
    for name, a, b in zip(NAMES, masked, unmasked):
        assert torch.equal(a, b), name


def test_kernels_refuse_a_chunk_table_without_the_chunks_first_tokens():
    from ratpt_kernels import rat_mixing

    proj, bias, _ = projection(1, 12, 2, 1, 32)
    with pytest.raises(ValueError, match="first_chunk and chunk_start"):
        rat_mixing(proj, bias, 8, 32, 1, ROPE_BASE, torch.zeros(1, 2, dtype=torch.int32, device=DEVICE))


def test_ungated_passes_over_packed_documents_equal_reference():
    # the kernels' entry points without the output gate: the backward then copies the output gradient into slots
    from ratpt_kernels.rat_bwd import rat_backward
    from ratpt_kernels.rat_fwd import rat_forward

    H, G, d, L, rows = CASES["L8"]
    chunks = DocumentChunks.of(packed_positions(rows), L)
    proj, bias, w = projection(len(rows), chunks.slot.shape[1], H, G, d)
    _, v, f, q, k = ops.split_projection(proj.detach(), d, G)
    documents = (chunks.first_chunk, chunks.start)
    y, lse, ks, vs = rat_forward(q, k, v, f, bias.detach(), L, d, ROPE_BASE, documents=documents)
    grads = rat_backward(w, q, k, v, f, bias.detach(), y, lse, ks, vs, L, d, ROPE_BASE, documents=documents)
    wide = [t.double().requires_grad_() for t in (q, k, v, f, bias.detach())]
    want = ops.rat_mixing_reference(*wide, L, d, ROPE_BASE, chunks)
    want_grads = torch.autograd.grad((want * w.double()).sum(), wide)
    for name, a, b in zip(["y", "dq", "dk", "dv", "df", "dgate_bias"], (y, *grads), (want, *want_grads)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
