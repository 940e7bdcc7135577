"""The ops over packed documents against each document run alone (float64), across query blocks and scan
blocks: RAT's mixing, attention in and out of a window, the reset recurrence."""
import pytest
import torch

from ratpt.ops import causal_attention, chunk_scan, document_attention, rat_mixing_reference, reset_scan
from ratpt.ops.documents import DocumentChunks

ROPE_BASE = 10000.0


def pieces(lengths: list[int]) -> tuple[torch.Tensor, list[slice]]:
    """positions [1, T] of documents of `lengths` packed in one row, and each document's slice."""
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return positions, [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def test_rat_mixing_over_packed_documents_equals_each_document_alone_across_query_blocks():
    L, d, H, G = 16, 4, 2, 1
    positions, docs = pieces([3, 16, 700, 1, 380, 20])  # 700 and 380 cross the 512-query blocks
    gen = torch.Generator().manual_seed(0)
    T = positions.shape[1]
    q, k = (torch.randn(1, T, G * d, generator=gen, dtype=torch.float64) for _ in range(2))
    v, f = (torch.randn(1, T, H * d, generator=gen, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(H * d, generator=gen, dtype=torch.float64)
    packed = rat_mixing_reference(q, k, v, f, bias, L, d, ROPE_BASE, DocumentChunks.of(positions, L))
    alone = torch.cat([rat_mixing_reference(q[:, s], k[:, s], v[:, s], f[:, s], bias, L, d, ROPE_BASE) for s in docs],
                      dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
def test_document_attention_equals_each_document_alone_across_query_blocks(window):
    positions, docs = pieces([2, 9, 1, 30, 6])
    q, k, v = torch.randn(3, 1, 2, positions.shape[1], 4, dtype=torch.float64).unbind(0)
    packed = document_attention(q, k, v, positions, window=window, query_block=8)
    alone = torch.cat([causal_attention(q[:, :, s], k[:, :, s], v[:, :, s], window=window) for s in docs], dim=2)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-12)


def test_reset_scan_restarts_the_recurrence_at_each_document():
    positions, docs = pieces([1, 300, 17, 40])  # 300: several levels of the hierarchical scan
    x = torch.randn(1, positions.shape[1], 3, dtype=torch.float64)
    g = torch.rand(1, positions.shape[1], 3, dtype=torch.float64)
    alone = torch.cat([chunk_scan(x[:, s], g[:, s], None) for s in docs], dim=1)
    torch.testing.assert_close(reset_scan(x, g, positions == 0), alone, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 100], ids=["full", "window100"])
def test_bf16_flex_document_attention_matches_float64_with_gradients(window):  # pragma: no cover
    gen = torch.Generator(device="cuda").manual_seed(0)
    positions = torch.cat([pieces([1, 127, 300, 596])[0], pieces([512, 512])[0]]).cuda()
    q, k, v, dy = (torch.randn(2, 4, 1024, 128, device="cuda", generator=gen) for _ in range(4))
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    high = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    got = document_attention(*low, positions, window=window)
    want = document_attention(*high, positions.cpu(), window=window)
    grads = torch.autograd.grad(got, low, dy.bfloat16())
    wants = torch.autograd.grad(want, high, dy.double().cpu())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (got, *grads), (want, *wants)):
        error = (a.double().cpu() - b).norm() / b.norm()
        assert error < 2e-2, f"{name}: relative error {error:.2e}"
