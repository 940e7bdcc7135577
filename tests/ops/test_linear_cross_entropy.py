"""The fused chunked head + loss against the logits-then-loss path: the summed loss and the gradients
of the hidden states and the head weight, in float64 (any chunking, ignored labels), under bf16
autocast over fp32 weights (LocalEngine) and with bf16 weights (megatron's mixed precision, DeepSpeed)."""
import pytest
import torch
import torch.nn.functional as F

from ratpt.ops.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy_sum


def unfused(hidden, weight, labels):
    """The logits, then the loss (ratpt.engines.loss.cross_entropy_sum; float64 stays float64)."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def inputs(dtype, T=37, D=16, V=50):
    torch.manual_seed(0)
    hidden = torch.randn(2, T, D, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, D, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (2, T))
    labels[0, :5] = IGNORE_INDEX  # positions without a target, as after a document boundary
    labels[1, -1] = IGNORE_INDEX
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels):
    loss = fn(hidden, weight, labels)
    (3.0 * loss).backward()  # a non-unit upstream gradient: the backward must scale what the forward kept
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 74, 1000], ids=lambda r: f"rows{r}")
def test_fused_equals_logits_then_loss_in_float64(chunk_rows):
    hidden, weight, labels = inputs(torch.float64)
    got, got_grads = loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk_rows=chunk_rows), hidden, weight,
                                    labels)
    want, want_grads = loss_and_grads(unfused, hidden, weight, labels)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_without_gradients_it_returns_the_same_loss_and_keeps_nothing():
    hidden, weight, labels = inputs(torch.float64)
    with torch.no_grad():
        got = linear_cross_entropy_sum(hidden, weight, labels, chunk_rows=8)
    assert got.grad_fn is None
    torch.testing.assert_close(got, unfused(hidden, weight, labels).detach(), rtol=1e-12, atol=0)


def test_under_bf16_autocast_over_fp32_weights_it_computes_as_the_unfused_path():
    hidden, weight, labels = inputs(torch.float32, T=64, D=32, V=96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk_rows=16), hidden, weight,
                                        labels)
        want, want_grads = loss_and_grads(unfused, hidden, weight, labels)
    assert [g.dtype for g in got_grads] == [torch.float32, torch.float32]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)  # bf16 logits in both; fp32 softmax
    # gradients: both are bf16 matmuls of bf16-rounded softmax − one-hot; the fused one rounds
    # grad_weight per chunk before its fp32 sum, so they differ at bf16 resolution
    for g, w in zip(got_grads, want_grads):
        assert (g - w).norm() <= 1e-2 * w.norm()


def test_with_bf16_weights_gradients_come_back_in_bf16_at_bf16_accuracy():
    hidden, weight, labels = inputs(torch.float64, T=64, D=32, V=96)
    exact, exact_grads = loss_and_grads(unfused, hidden, weight, labels)
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    got, got_grads = loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk_rows=16), h16, w16, labels)
    assert [g.dtype for g in got_grads] == [torch.bfloat16, torch.bfloat16]
    assert abs(got.double() - exact) <= 1e-2 * exact
    for g, w in zip(got_grads, exact_grads):
        assert (g.double() - w).norm() <= 2e-2 * w.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "autocast-fp32-weights"])
def test_on_the_gpu_at_a_real_vocabulary_it_has_bf16_accuracy(autocast):
    torch.manual_seed(0)
    hidden = torch.randn(2, 4096, 512, dtype=torch.float64, device="cuda")
    weight = torch.randn(32000, 512, dtype=torch.float64, device="cuda") * 0.05
    labels = torch.randint(0, 32000, (2, 4096), device="cuda")
    labels[:, :7] = IGNORE_INDEX
    exact = [t.clone().requires_grad_() for t in (hidden, weight)]
    exact_loss, exact_grads = loss_and_grads(unfused, *exact, labels)
    dtype = torch.float32 if autocast else torch.bfloat16
    h, w = (t.to(dtype).requires_grad_() for t in (hidden, weight))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        got, got_grads = loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk_rows=3000), h, w, labels)
    assert [g.dtype for g in got_grads] == [dtype, dtype]
    assert abs(got.double() - exact_loss) <= 1e-3 * exact_loss
    for g, e in zip(got_grads, exact_grads):
        assert (g.double() - e).norm() <= 2e-2 * e.norm()
