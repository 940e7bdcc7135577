"""inter_chunk_attention against a dense T×T masked softmax (docs/design.md#softmax-over-chunk-summaries)."""
import os
import subprocess
import sys

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


HUNDRED_K = """
import resource, sys, torch
from ratpt.ops import inter_chunk_attention
torch.manual_seed(0)
T, L = 100_000, 16
q, k, v = (torch.randn(1, 1, T, 8) for _ in range(3))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    out = inter_chunk_attention(q, k, v, L, query_block=2048)
worst = 0.0
for t in (0, 15, 16, 4097, 50_000, T - 1):  # float64 softmax over the row's visible keys, written out
    visible = [s for s in range(L - 1, t - t % L, L)] + [t]
    keys, values = k[0, 0, visible].double(), v[0, 0, visible].double()
    want = torch.softmax(keys @ q[0, 0, t].double() / 8 ** 0.5, 0) @ values
    worst = max(worst, float((out[0, 0, t].double() - want).abs().max()))
print(worst, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_100k_tokens_fit_without_a_quadratic_score_matrix():
    """T×(T/L) fp32 scores would be 2.5 GB here; blockwise it is a few MB per block. In a process of
    its own, so that its peak memory is this computation's."""
    run = subprocess.run([sys.executable, "-c", HUNDRED_K], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-2000:]
    worst, grown_mib = run.stdout.split()
    assert float(worst) < 1e-5, f"sampled rows differ from the float64 reference by {worst}"
    assert int(grown_mib) < 1200, f"peak memory grew by {grown_mib} MiB (seen: 630): T×T/L fp32 scores are 2400"
