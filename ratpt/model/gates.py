"""The forget-gate initialisation shared by the RAT and RNN mixers (the gate itself: ratpt.ops.forget_gate)."""
import torch
from torch import nn


def chrono_init_(gate_bias: nn.Parameter, horizon: int) -> None:
    """gate_bias ~ log U(1, horizon - 1) (reference init; horizon = L for RAT, seq_len for RNN).

    sigmoid(log u) = u / (1 + u): initial memory spans of 1 .. horizon-1 tokens. For horizon <= 2
    the range is empty and the bias is log 1 = 0.
    """
    with torch.no_grad():
        if horizon <= 2:
            gate_bias.zero_()
        else:
            gate_bias.uniform_(1.0, horizon - 1.0).log_()
