"""The attention of one context-parallel block over the gathered prefix (ratpt.parallel.context_parallel):
queries at the last n positions of a prefix see every key up to their own position. Against a dense
masked softmax in float64 on CPU (where the lower-right bias is materialised), and in bf16 on a GPU
(FlashAttention with the bias) against the same softmax in fp32."""
import pytest
import torch

from ratpt.parallel.context_parallel import _attend_prefix


def dense_prefix_attention(q, k, v):
    n, total = q.shape[2], k.shape[2]
    q_pos = torch.arange(total - n, total).unsqueeze(-1)
    allowed = torch.arange(total) <= q_pos
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed.to(q.device), float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("n, total", [(5, 5), (4, 11), (1, 9)], ids=["whole-prefix", "middle-block", "last-token"])
def test_block_attends_keys_up_to_its_own_positions(n, total):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, total, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got, want = _attend_prefix(q, k, v), dense_prefix_attention(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), dy)
    for g, w in zip(grads, torch.autograd.grad(want, (q, k, v), dy)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
def test_bf16_flash_block_matches_fp32_softmax():  # pragma: no cover - needs CUDA
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 16, 1024, 128, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(1, 16, 4096, 128, device="cuda", generator=gen).bfloat16() for _ in range(2))
    got = _attend_prefix(q, k, v).float()
    want = dense_prefix_attention(q.float(), k.float(), v.float())
    # bf16 output rounding (2^-8 relative) on O(0.1) values averaged over thousands of keys
    assert (got - want).norm() / want.norm() < 1e-2
