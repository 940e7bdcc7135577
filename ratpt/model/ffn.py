"""Feed-forward sublayer: W2·GELU(W1·) (paper, exact GELU, no bias) or SwiGLU."""
import torch
import torch.nn.functional as F
from torch import nn

from ratpt.model.config import ModelConfig


def ffn_hidden(cfg: ModelConfig) -> int:
    """Hidden width F of the FFN (4·D in the paper)."""
    return round(cfg.ffn_mult * cfg.d_model)


class FFN(nn.Module):
    """GELU: fc1 [F, D], fc2 [D, F]. SwiGLU: fc1 [2F, D] packs (gate, up), fc2 [D, F]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden(cfg)
        self.swiglu = cfg.ffn == "swiglu"
        self.fc1 = nn.Linear(cfg.d_model, 2 * hidden if self.swiglu else hidden, bias=False)
        self.fc2 = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(h))
