"""causal_attention (full and windowed) and windowed_attention against a dense masked softmax.

The window's GPU path is FlexAttention over a block mask; on CPU, FlexAttention's forward runs
unfused over the same mask function (no backward there), which checks the positions and offsets
exactly in float64, and the block mask's key blocks are checked against the dense mask. The
compiled kernel itself, forward and backward, is checked in bf16 on a GPU.
"""
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from ratpt.ops import causal_attention, windowed_attention
from ratpt.ops.sliding_window_attention import flex_runs, window_block_mask


def allowed_pairs(T, S, window, q_start=0, k_start=0, device="cpu"):
    """[T, S]: query at q_start + i sees key at k_start + j."""
    t = torch.arange(q_start, q_start + T, device=device)[:, None]
    s = torch.arange(k_start, k_start + S, device=device)[None, :]
    allowed = (s <= t) & (s >= 0)
    return allowed & (t - s <= window) if window is not None else allowed


def dense(q, k, v, window, q_start=0, k_start=0):
    allowed = allowed_pairs(q.shape[2], k.shape[2], window, q_start, k_start, q.device)
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


# (T queries, window, q_start, k_start): windows below and above the 16-token block, T not a multiple
# of it, and a context-parallel block (keys from W before its first query, the first ones below 0)
WINDOWS = {"W5-T50": (50, 5, 0, 0), "W40-T50": (50, 40, 0, 0), "W21-T37-cp-first": (37, 21, 0, -21),
           "W21-T37-cp-later": (37, 21, 74, 53)}


@pytest.mark.parametrize("T,window,q_start,k_start", WINDOWS.values(), ids=WINDOWS.keys())
def test_flex_window_matches_dense_float64(T, window, q_start, k_start):
    gen = torch.Generator().manual_seed(0)
    S = T + q_start - k_start
    q = torch.randn(2, 3, T, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 3, S, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = window_block_mask(window, q_start, k_start, T, S, torch.device("cpu"), block=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": the unfused path is the point here
        got = flex_attention(q, k, v, block_mask=mask)
    torch.testing.assert_close(got, dense(q, k, v, window, q_start, k_start), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(windowed_attention(q, k, v, window, q_start, k_start, query_block=7),
                               dense(q, k, v, window, q_start, k_start), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T,window,q_start,k_start", WINDOWS.values(), ids=WINDOWS.keys())
def test_window_block_mask_lists_exactly_the_blocks_with_visible_keys(T, window, q_start, k_start):
    S, block = T + q_start - k_start, 16
    listed = window_block_mask(window, q_start, k_start, T, S, torch.device("cpu"), block=block).to_dense()[0, 0]
    pad = allowed_pairs(-(-T // block) * block, -(-S // block) * block, window, q_start, k_start)
    pad[T:], pad[:, S:] = False, False
    want = pad.unflatten(0, (-1, block)).unflatten(2, (-1, block)).any(3).any(1)
    assert torch.equal(listed.bool(), want)


GPU_WINDOWS = {"W100-T1000": (1000, 100, 0, 0), "W300-T1000": (1000, 300, 0, 0),
               "W300-T1000-cp-later": (1000, 300, 1000, 700)}


@pytest.mark.gpu
@pytest.mark.parametrize("T,window,q_start,k_start", GPU_WINDOWS.values(), ids=GPU_WINDOWS.keys())
def test_bf16_flex_window_matches_float64_with_gradients(T, window, q_start, k_start):  # pragma: no cover
    gen = torch.Generator(device="cuda").manual_seed(0)
    S = T + q_start - k_start
    q = torch.randn(2, 4, T, 128, device="cuda", generator=gen)
    k, v = (torch.randn(2, 4, S, 128, device="cuda", generator=gen) for _ in range(2))
    dy = torch.randn(2, 4, T, 128, device="cuda", generator=gen)
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    high = [t.double().requires_grad_() for t in (q, k, v)]
    got = windowed_attention(*low, window, q_start, k_start)
    want = dense(*high, window, q_start, k_start)
    grads = torch.autograd.grad(got, low, dy.bfloat16())
    wants = torch.autograd.grad(want, high, dy.double())
    # bf16 inputs and outputs (2^-8 relative rounding) over O(W) keys: ~1% relative in norm
    for name, a, b in zip(("out", "dq", "dk", "dv"), (got, *grads), (want, *wants)):
        error = (a.double() - b).norm() / b.norm()
        assert error < 2e-2, f"{name}: relative error {error:.2e}"


def test_flex_runs_in_training_and_compiled_graphs_not_in_eager_inference():
    cuda_tensor = SimpleNamespace(is_cuda=True)  # the rule reads only the device
    assert flex_runs(cuda_tensor)
    with torch.no_grad():  # prefill and generation: prompt lengths vary, FlexAttention would recompile
        assert not flex_runs(cuda_tensor)
    assert not flex_runs(torch.zeros(1))

