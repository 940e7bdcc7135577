"""RMSNorm (eps 1e-6 in the paper): x / sqrt(mean(x²) + eps) · weight, reduced in >= fp32."""
import torch
from torch import nn

from ratpt import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)
