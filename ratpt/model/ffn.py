"""Feed-forward sublayer: W2·GELU(W1·) (paper, exact GELU, no bias) or SwiGLU."""
import torch
from torch import nn

from ratpt import ops
from ratpt.model.config import ModelConfig
from ratpt.model.norm import RMSNorm


def ffn_hidden(cfg: ModelConfig) -> int:
    """Hidden width F of the FFN (4·D in the paper)."""
    return round(cfg.ffn_mult * cfg.d_model)


class FFN(nn.Module):
    """GELU: fc1 [F, D], fc2 [D, F]. SwiGLU: fc1 [2F, D] packs (gate, up), fc2 [D, F]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden(cfg)
        self.swiglu = cfg.ffn == "swiglu"
        self.activation = cfg.ffn  # gelu | swiglu, as ops.activate names them
        self.kernels = cfg.kernels
        self.fc1 = nn.Linear(cfg.d_model, 2 * hidden if self.swiglu else hidden, bias=False)
        self.fc2 = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ops.activate(self.fc1(x), self.activation))

    def decode(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """x + FFN(norm(x)) for one token per sequence, x [B, 1, D]: norm, fc1 and activation in one
        launch, fc2 and the residual in another (ops.decode_linear)."""
        h = ops.decode_linear(x, self.fc1.weight, norm.weight, norm.eps, self.activation, kernels=self.kernels)
        return ops.decode_linear(h, self.fc2.weight, residual=x, kernels=self.kernels)
