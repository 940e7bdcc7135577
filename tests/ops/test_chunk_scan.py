"""chunk_scan against a step-by-step loop: outputs and gradients, any T and L."""
import pytest
import torch

from ratpt.ops import chunk_scan


def loop_scan(x, g, L):
    out, state = [], torch.zeros_like(x[:, 0])
    for t in range(x.shape[1]):
        keep = g[:, t] * state if (L is None or t % L) else 0
        state = keep + (1 - g[:, t]) * x[:, t]
        out.append(state)
    return torch.stack(out, 1)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 300], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("L", [1, 4, 7, 64, None], ids=lambda l: f"L{l}")
def test_chunk_scan_matches_loop_with_gradients(L, T):
    torch.manual_seed(0)
    x = torch.randn(2, T, 3, dtype=torch.float64, requires_grad=True)
    g = torch.rand(2, T, 3, dtype=torch.float64).mul(0.98).add(0.01).requires_grad_()
    got, want = chunk_scan(x, g, L), loop_scan(x, g, L)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(want)
    grads = torch.autograd.grad((got * w).sum(), (x, g))
    grads_want = torch.autograd.grad((want * w).sum(), (x, g))
    for a, b in zip(grads, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_chunk_scan_runs_in_fp32_and_returns_input_dtype():
    x = torch.randn(1, 40, 4, dtype=torch.bfloat16)
    g = torch.rand(1, 40, 4)
    got = chunk_scan(x, g, 16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), loop_scan(x.float(), g, 16), rtol=1e-2, atol=1e-2)


def test_rnn_scan_over_100k_tokens_is_exact_at_the_end():
    """The hierarchical scan over a long sequence: the last state equals a closed form."""
    T = 100_000
    g = torch.full((1, T, 2), 0.999, dtype=torch.float64)
    x = torch.ones(1, T, 2, dtype=torch.float64)
    got = chunk_scan(x, g, None)
    torch.testing.assert_close(got[0, -1], torch.full((2,), 1 - 0.999 ** T, dtype=torch.float64))
