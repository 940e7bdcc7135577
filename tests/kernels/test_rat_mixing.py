"""The fused Triton RAT mixing against the PyTorch reference ops: output and every gradient.

On CPU the kernels run in the Triton interpreter (tests/kernels/conftest.py), in fp32, on
small shapes that still cross several query blocks and summary blocks (the interpreter uses
16-row blocks), partial final chunks, T < L, G in {1, 2, 4} and d in {32, 64, 128}.

Tolerance: both sides are compared with a float64 evaluation of the reference on the same
inputs. The kernels keep every reduction in fp32, so their error is a few fp32 ulps times the
reduction lengths here (<= 2·d products, <= T/L summaries, <= L recurrence steps): below 1e-5
for these O(1) values; 1e-4 leaves room without hiding a wrong term (a wrong term is O(1)).
"""
import pytest
import torch

from kernels import rat_mixing
from ratpt.ops.rat_mixing import rat_mixing_reference, use_triton

ROPE_BASE = 10000.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU machine the same tests run compiled


def make_inputs(B, T, H, G, d, dtype=torch.float32, device=DEVICE, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(B, T, G * d, dtype=dtype, device=device)
    k = torch.randn(B, T, G * d, dtype=dtype, device=device)
    v = torch.randn(B, T, H * d, dtype=dtype, device=device)
    f = torch.randn(B, T, H * d, dtype=dtype, device=device)
    bias = torch.randn(H * d, dtype=torch.float32, device=device)
    return [t.requires_grad_() for t in (q, k, v, f, bias)]


def output_and_grads(fn, inputs, w, L, d):
    y = fn(*inputs, L, d, ROPE_BASE)
    return [y, *torch.autograd.grad((y * w).sum(), inputs)]


CASES = {  # name: (B, T, H, G, d, L)
    "partial-last-chunk": (2, 37, 2, 1, 32, 4),
    "groups2-L8": (1, 33, 4, 2, 32, 8),
    "groups4-L8": (1, 17, 4, 4, 32, 8),
    "d64-L16": (1, 40, 2, 2, 64, 16),
    "d128-L8": (1, 24, 2, 1, 128, 8),
    "T-below-L": (2, 5, 2, 1, 32, 16),
    "many-summary-blocks-L4": (1, 96, 2, 1, 32, 4),
    "L1": (1, 19, 2, 1, 32, 1),
}


@pytest.mark.parametrize("shape", CASES.values(), ids=CASES.keys())
def test_triton_mixing_equals_reference_output_and_gradients(shape):
    B, T, H, G, d, L = shape
    inputs = make_inputs(B, T, H, G, d)
    w = torch.randn(B, T, H * d, device=DEVICE)
    got = output_and_grads(rat_mixing, inputs, w, L, d)
    wide = [t.detach().double().requires_grad_() for t in inputs]
    want = output_and_grads(rat_mixing_reference, wide, w.double(), L, d)
    for name, a, b in zip(["y", "dq", "dk", "dv", "df", "dgate_bias"], got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_dispatch_picks_reference_on_cpu_and_rejects_unknown_backends():
    v = torch.zeros(1, 4, 8)
    assert not use_triton("auto", v, 16, 64)
    assert not use_triton("torch", v, 16, 64)
    assert use_triton("triton", v, 16, 64)
    with pytest.raises(ValueError, match="power of two"):
        use_triton("triton", v, 12, 64)
    with pytest.raises(ValueError, match="kernels must be"):
        use_triton("cuda", v, 16, 64)


def test_rat_layer_with_triton_kernels_equals_torch_reference():
    from ratpt.model.config import ModelConfig
    from ratpt.model.rat import RATMixer

    torch.manual_seed(0)
    layers = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        layers[kernels] = RATMixer(ModelConfig(d_model=64, head_dim=32, ngroups=2, chunk_size=4, kernels=kernels))
        layers[kernels].reset_gate_bias()
        layers[kernels].to(DEVICE)
    x = torch.randn(1, 13, 64, requires_grad=True, device=DEVICE)
    outs = {name: layer(x) for name, layer in layers.items()}
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-4, atol=1e-5)
    w = torch.randn_like(x)
    grads = {name: torch.autograd.grad((out * w).sum(), [x, *layers[name].parameters()])
             for name, out in outs.items()}
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
