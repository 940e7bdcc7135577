"""inter_chunk_attention against a dense T×T masked softmax (DESIGN §1 visibility rule)."""
import pytest
import torch

from ratpt.ops import inter_chunk_attention


def dense(q, k, v, L):
    T = q.shape[2]
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    visible = (s == t) | ((s % L == L - 1) & (s // L < t // L))
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("block", [1, 8, 512], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("T", [1, 9, 24, 37], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("L", [1, 4, 5], ids=lambda l: f"L{l}")
def test_inter_chunk_attention_matches_dense_with_gradients(L, T, block):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got, want = inter_chunk_attention(q, k, v, L, query_block=block), dense(q, k, v, L)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)),
                    torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_100k_tokens_fit_without_a_quadratic_score_matrix():
    """T×(T/L) scores would be 2.5 GB here; blockwise it is a few MB per block."""
    T, L = 100_000, 16
    q, k, v = (torch.randn(1, 1, T, 8) for _ in range(3))
    with torch.no_grad():
        out = inter_chunk_attention(q, k, v, L, query_block=2048)
    assert out.shape == (1, 1, T, 8) and torch.isfinite(out).all()
