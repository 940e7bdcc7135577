"""The RNN layer: RAT's gated recurrence over the whole sequence, no attention (the L = T limit).

    h = RMSNorm(x);  z, v, f = split(W_in h, [D, D, D]);  g = sigmoid(f + gate_bias) (fp32)
    ṽ[t] = g[t]·ṽ[t-1] + (1-g[t])·v[t];   out = x + W_out (sigmoid(z) ⊙ ṽ)
    (over packed documents, ṽ[t-1] := 0 at each document's first token)

Its in_proj rows are the first 3·D rows of RAT's (z, v, g), so RAT with L = T and these
weights gives the same output (a softmax over the own state alone is 1).
"""
import torch
from torch import nn

from ratpt import ops
from ratpt.model.cache import RNNCache, gather_positions
from ratpt.model.config import ModelConfig
from ratpt.model.gates import chrono_init_
from ratpt.model.norm import RMSNorm
from ratpt.ops.documents import Documents


class RNNMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        self.d_model = D  # tensor-parallel seam: one rank's share under ratpt.parallel.tensor_parallel
        self.gate_horizon = cfg.rnn_gate_horizon
        self.input_norm = RMSNorm(D, cfg.norm_eps)
        self.in_proj = nn.Linear(D, 3 * D, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(D))
        self.out_proj = nn.Linear(D, D, bias=False)

    def reset_gate_bias(self) -> None:
        chrono_init_(self.gate_bias, self.gate_horizon)

    def forward(self, x: torch.Tensor, documents: Documents | None = None) -> torch.Tensor:
        """x [B, T, D]; documents: the batch's packed documents (None: one per row)."""
        z, v, g = self._project(x)
        state = (ops.chunk_scan(v, g, chunk_size=None) if documents is None
                 else ops.reset_scan(v, g, documents.positions == 0))
        return x + self.out_proj(z * state)

    def prefill(self, x: torch.Tensor, lengths: torch.Tensor, capacity: int) -> tuple[torch.Tensor, RNNCache]:
        """Forward over a right-padded batch; cache each sequence's state (whatever the capacity)."""
        z, v, g = self._project(x)
        state = ops.chunk_scan(v, g, chunk_size=None)
        return x + self.out_proj(z * state), RNNCache(state=gather_positions(state, lengths - 1).to(g.dtype))

    def decode(self, x: torch.Tensor, cache: RNNCache, positions: torch.Tensor) -> torch.Tensor:
        z, v, g = self._project(x)
        cache.state.copy_(g[:, 0] * cache.state + (1 - g[:, 0]) * v[:, 0].to(g.dtype))
        return x + self.out_proj(z * cache.state.to(x.dtype).unsqueeze(1))

    def extend(self, x: torch.Tensor, cache: RNNCache, start: int) -> torch.Tensor:
        """Continue a prefill with x [B, P, D]: the scan starts from the cached state (any `start`)."""
        z, v, g = self._project(x)
        # the cached state as step 0 of the scan: y[0] = state, y[t] = g[t]·y[t-1] + (1 - g[t])·v[t]
        u = torch.cat((cache.state.unsqueeze(1), (1 - g) * v.to(g.dtype)), dim=1)
        state = ops.linear_scan(torch.cat((g[:, :1], g), dim=1), u)[:, 1:]
        cache.state.copy_(state[:, -1])
        return x + self.out_proj(z * state.to(x.dtype))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, v, f = self.in_proj(self.input_norm(x)).split(self.d_model, dim=-1)
        return torch.sigmoid(z), v, ops.forget_gate(f, self.gate_bias)
