"""The length-aware attention decode kernel (ratpt_kernels.attention_decode) against a float64
softmax over the visible slots: in the Triton interpreter on CPU (fp32, 16-slot blocks), with one
split and with several (the merge kernel), and visible counts of one slot, past a block, across
splits and the whole cache; in bf16 on a GPU at the 1.3B models' head shape."""
import pytest
import torch

from ratpt.ops import attention_decode_reference
from ratpt_kernels import attention_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, H, S, d, visible, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=gen).to(device, dtype) for shape in
               [(B, H, 1, d), (B, H, S, d), (B, H, S, d)])
    return q, k, v, torch.tensor(visible, device=device)


def softmax_over_visible(q, k, v, visible):
    q, k, v = q.double(), k.double(), v.double()
    return attention_decode_reference(q, k, v, visible)


@pytest.mark.parametrize("dots", [False, True], ids=["fma", "dots"])
@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
def test_kernel_equals_softmax_over_the_visible_slots(splits, dots):
    q, k, v, visible = inputs(4, 2, 70, 16, [1, 17, 40, 70], torch.float32, DEVICE)
    got = attention_decode(q, k, v, visible, splits=splits, dots=dots)
    torch.testing.assert_close(got.double(), softmax_over_visible(q, k, v, visible), rtol=1e-4, atol=1e-4)


def test_slots_past_the_visible_ones_are_never_read():
    q, k, v, visible = inputs(2, 2, 48, 16, [5, 33], torch.float32, DEVICE)
    want = attention_decode(q, k, v, visible, splits=2)
    for b, n in enumerate(visible.tolist()):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    assert torch.equal(attention_decode(q, k, v, visible, splits=2), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dots", [False, True], ids=["fma", "dots"])
@pytest.mark.parametrize("splits", [None, 1], ids=["default-splits", "one-split"])
def test_bf16_kernel_equals_float64_softmax(splits, dots):  # pragma: no cover - needs CUDA
    q, k, v, visible = inputs(8, 16, 4096, 128, [1, 63, 64, 1000, 3072, 3584, 4095, 4096], torch.bfloat16, "cuda")
    got = attention_decode(q, k, v, visible, splits=splits, dots=dots)
    want = softmax_over_visible(q, k, v, visible)
    # bf16 output rounding (2^-8 relative) of an fp32 accumulation
    assert (got.double() - want).norm() / want.norm() < 1e-2
