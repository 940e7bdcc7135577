"""The head and the loss in one op: summed cross-entropy of hidden · Wᵀ, chunk by chunk of tokens.

The logits are the largest tensors of a step: at 131072 tokens and vocab 32000 they are 8.4 GB in
bf16, and their fp32 softmax and its gradient as much again twice. Because the loss ends the
step, each chunk's gradients with respect to the hidden states and the head weight can be
formed in the forward (softmax − one-hot, then two matmuls), so only a [chunk, vocab] block of
logits exists at a time; the backward scales what the forward kept: grad_hidden [tokens, D] (the
compute dtype) and grad_weight [vocab, D] (fp32, summed over the chunks). The arithmetic is the
unfused path's: bf16 matmuls under autocast or bf16 weights, the softmax in fp32. `compiled`
(train.compile) runs each chunk's softmax and gradient through inductor: one pass over the bf16
logits instead of a handful of fp32 ones.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_BYTES = 2**30  # fp32 logits of one chunk: ≈ 8192 tokens at vocab 32000


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_rows: int | None = None, compile_backend: str | None = None) -> torch.Tensor:
    """Summed cross-entropy of hidden [..., D] · weight [V, D]ᵀ against labels [...] (IGNORE_INDEX
    skipped), as `F.cross_entropy(F.linear(hidden, weight).float(), ...)` computes it: the softmax and
    the sum in fp32 (float64 for float64 inputs).
    `chunk_rows`: tokens per chunk (default: fp32 logits of about CHUNK_BYTES). `compile_backend`: the
    torch.compile backend of each chunk's softmax and gradient (train.compile), or None (eager)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    rows = chunk_rows or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss_and_grad = _compiled_loss_and_grad(compile_backend) if compile_backend else _loss_and_grad
        return _LinearCrossEntropy.apply(flat_hidden, weight, flat_labels, rows, dtype, loss_and_grad)
    with torch.autocast(device_type, enabled=False):
        w = weight.to(dtype)
        return sum(_loss(F.linear(flat_hidden[i:i + rows].to(dtype), w), flat_labels[i:i + rows])[0]
                   for i in range(0, flat_labels.numel(), rows))


def _loss(logits: torch.Tensor, labels: torch.Tensor):
    """(summed loss, logits in fp32 or wider, their log-sum-exp, labelled mask, clamped targets) of a chunk."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(wide, dim=-1)
    labelled = labels != IGNORE_INDEX
    targets = labels.clamp_min(0)
    picked = wide.gather(1, targets[:, None])[:, 0]
    return torch.where(labelled, lse - picked, 0.0).sum(), wide, lse, labelled, targets


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, its gradient with respect to the logits, in their dtype) of one chunk."""
    loss, wide, lse, labelled, targets = _loss(logits, labels)
    probs = wide.sub_(lse[:, None]).exp_()  # softmax, in place (the logits are the caller's temporary)
    probs[torch.arange(len(targets), device=probs.device), targets] -= 1.0
    return loss, probs.mul_(labelled[:, None]).to(logits.dtype)


@functools.cache
def _compiled_loss_and_grad(backend: str):
    return torch.compile(_loss_and_grad, dynamic=False, backend=backend)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, rows: int, dtype: torch.dtype, loss_and_grad):
        w = weight.to(dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
        wide = torch.promote_types(dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device)
        total = torch.zeros((), dtype=wide, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, labels.numel(), rows):
                h = hidden[start:start + rows].to(dtype)
                loss, grad_logits = loss_and_grad(F.linear(h, w), labels[start:start + rows])
                total += loss
                grad_hidden[start:start + rows] = grad_logits @ w
                grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_total).to(hidden_dtype), (grad_weight * grad_total).to(weight_dtype),
                None, None, None, None)
