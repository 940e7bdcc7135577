"""causal_attention (full and windowed) against a dense masked softmax."""
import pytest
import torch

from ratpt.ops import causal_attention


def dense(q, k, v, window):
    T = q.shape[2]
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    allowed = (s <= t) & ((t - s <= window) if window is not None else True)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("block", [3, 512], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("window", [None, 0, 1, 4, 30], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("T", [1, 10, 23], ids=lambda t: f"T{t}")
def test_causal_attention_matches_dense_with_gradients(T, window, block):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, T, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got, want = causal_attention(q, k, v, window, query_block=block), dense(q, k, v, window)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)),
                    torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
