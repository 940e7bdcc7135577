"""The fused decode linear op (ratpt.ops.decode_linear): the Triton kernel against the reference, and
the reference against the modules it stands in for.

1. On CPU the kernel runs in the Triton interpreter in fp32 (IEEE dots) with K and N that are not
   multiples of the blocks (masked tails in both loops) and several K steps; each combination of
   norm, activation and residual is compared with a float64 evaluation of the reference. The kernel
   keeps everything in fp32 over K = 40 products of O(1) values, so its error is ~1e-6; 1e-4 leaves
   room without hiding a wrong term (a missing 1 / rms, a swapped gate and up half).
2. The reference is exactly what RMSNorm, nn.Linear, the FFN's activation and the residual add give.
"""
import pytest
import torch

from ratpt.model import ModelConfig
from ratpt.model.ffn import FFN
from ratpt.model.norm import RMSNorm
from ratpt.ops import decode_linear
from ratpt_kernels import decode_linear as triton_decode_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K, N, EPS = 40, 40, 1e-6


def inputs(rows, activation, seed=0):
    """x [rows, K], W [N or 2N, K], norm weight [K], residual [rows, N]."""
    gen = torch.Generator().manual_seed(seed)
    out_rows = 2 * N if activation == "swiglu" else N
    x, w = torch.randn(rows, K, generator=gen), torch.randn(out_rows, K, generator=gen) / K ** 0.5
    norm, residual = torch.rand(K, generator=gen) + 0.5, torch.randn(rows, N, generator=gen)
    return [t.to(DEVICE) for t in (x, w, norm, residual)]


@pytest.mark.parametrize("split", [1, 3], ids=["whole-k", "split-k3"])
@pytest.mark.parametrize("rows", [1, 3, 5, 64], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("activation, norm, residual", [("none", True, False), ("gelu", True, False),
                                                        ("swiglu", True, False), ("none", False, True),
                                                        ("swiglu", False, True)],
                         ids=["norm", "norm-gelu", "norm-swiglu", "residual", "swiglu-residual"])
def test_triton_decode_linear_equals_reference(rows, activation, norm, residual, split):
    """Rows 1 and 3 take the FMA path (3: a padded fourth row), 5 and 64 the tensor-core tile; split 3 cuts
    K = 40 into pieces of 16, 16 and 8 (a short last one), summed by the second launch."""
    x, w, g, r = inputs(rows, activation)
    g, r = (g if norm else None), (r if residual else None)
    want = decode_linear(x.double(), w.double(), None if g is None else g.double(), EPS, activation,
                         None if r is None else r.double(), kernels="torch")
    got = triton_decode_linear(x, w, g, EPS, activation, r, block_k=16, split=split)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
def test_reference_is_the_modules_norm_linear_activation_and_residual(ffn):
    """FFN.decode on the reference path is bit for bit x + FFN(RMSNorm(x)), as the block's forward."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=K, ffn=ffn, ffn_mult=1.5, kernels="torch")
    module, norm = FFN(cfg), RMSNorm(K)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(3, 1, K)
    torch.testing.assert_close(module.decode(x, norm), x + module(norm(x)), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [1, 4], ids=["whole-k", "split-k4"])
@pytest.mark.parametrize("rows", [1, 3, 64], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bf16_decode_linear_at_model_width_is_within_bf16_rounding(rows, activation, split):
    """D 2048, F 8192 (RAT-1.3B's FFN) in bf16 with the default launch (K split in 4 or not; FMAs at 1 and 3
    rows, the tensor-core tile at 64): fc1 with norm and activation, fc2 with the residual, against the fp32
    reference on the same bf16 inputs. Outputs are O(1) and the reference rounds once to bf16 (≈ 4e-3
    relative): 2e-2 allows the kernel's other rounding order."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    D, F = 2048, 8192
    x = torch.randn(rows, D, device="cuda", generator=gen).bfloat16()
    w1 = (torch.randn(2 * F if activation == "swiglu" else F, D, device="cuda", generator=gen) / D ** 0.5).bfloat16()
    w2 = (torch.randn(D, F, device="cuda", generator=gen) / F ** 0.5).bfloat16()
    g = (torch.rand(D, device="cuda", generator=gen) + 0.5).bfloat16()
    h = triton_decode_linear(x, w1, g, EPS, activation, None, split=split)
    want_h = decode_linear(x.float(), w1.float(), g.float(), EPS, activation, kernels="torch")
    torch.testing.assert_close(h.float(), want_h, rtol=2e-2, atol=2e-2)
    y = triton_decode_linear(h, w2, None, EPS, "none", x, split=split)
    torch.testing.assert_close(y.float(), decode_linear(h.float(), w2.float(), residual=x.float(), kernels="torch"),
                               rtol=2e-2, atol=2e-2)
