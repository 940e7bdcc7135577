"""The RAT layer (arXiv 2507.04416; docs/design.md#the-rat-layer), pre-norm and residual included.

    h = RMSNorm(x);  z, v, f, q, k = split(W_in h, [D, D, D, G·d, G·d])
    g = sigmoid(f + gate_bias)                               (fp32)
    q, k tiled from G groups to H heads (head h uses group h mod G)
    ṽ, k̃ = gated recurrences of v, k inside each chunk of L tokens (reset at chunk start)
    q, k̃ rotated by the chunk index; each token attends with one softmax over the earlier
    chunks' final (k̃, ṽ) and its own (k̃, ṽ)
    out = x + W_out (sigmoid(z) ⊙ y)

Over packed documents (`positions`) the chunks restart at every document's first token and a token sees
only its own document (docs/design.md#packed-documents).

Parameter names follow the reference code (in_proj rows z, v, g, q, k; gate_bias; input_norm;
out_proj) so that its checkpoints load without renaming.
"""
import torch
from torch import nn

from ratpt import ops
from ratpt.model.cache import RATCache, ensure_slots, summary_slots
from ratpt.model.config import ModelConfig, n_heads
from ratpt.model.gates import chrono_init_
from ratpt.model.norm import RMSNorm
from ratpt.ops.documents import Documents
from ratpt.ops.sliding_window_attention import QUERY_BLOCK


class RATMixer(nn.Module):
    # Context-parallel seam (docs/design.md#context-parallelism): None here; ratpt.parallel.context_parallel
    # sets it to an object whose rat_mixing() stands in for the ungated part of ops.rat_mixing on one rank's
    # run of whole chunks.
    context_shard = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Tensor-parallel seam: ratpt.parallel.tensor_parallel sets d_model, n_heads to one rank's share.
        self.d_model, self.head_dim, self.ngroups = cfg.d_model, cfg.head_dim, cfg.ngroups
        self.n_heads = n_heads(cfg)
        self.chunk_size = cfg.chunk_size
        self.rope_base = cfg.rope_base
        self.kernels = cfg.kernels
        D, qk = cfg.d_model, cfg.ngroups * cfg.head_dim
        self.input_norm = RMSNorm(D, cfg.norm_eps)
        self.in_proj = nn.Linear(D, 3 * D + 2 * qk, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(D))
        self.out_proj = nn.Linear(D, D, bias=False)

    def reset_gate_bias(self) -> None:
        chrono_init_(self.gate_bias, self.chunk_size)

    def forward(self, x: torch.Tensor, documents: Documents | None = None) -> torch.Tensor:
        """x [B, T, D]; documents: the batch's packed documents (None: one per row), with their chunk table
        at this layer's chunk size (ratpt.ops.documents.separate_documents)."""
        return self._mix(x, documents)

    def prefill(self, x: torch.Tensor, lengths: torch.Tensor, capacity: int) -> tuple[torch.Tensor, RATCache]:
        """Forward over a right-padded batch; cache the chunk summaries (slots for `capacity` tokens)
        and the running state (ops.rat_prefill_mixing: on the kernels, the forward's own states)."""
        z, v, f, q, k = self._split(x)
        y, summary_k, summary_v, running_k, running_v = ops.rat_prefill_mixing(
            q, k, v, f, self.gate_bias, lengths, self.chunk_size, self.head_dim, self.rope_base, kernels=self.kernels)
        slots = summary_slots(capacity, self.chunk_size)
        cache = RATCache(summary_k=ensure_slots(summary_k, slots), summary_v=ensure_slots(summary_v, slots),
                         running_k=running_k, running_v=running_v, chunk_size=self.chunk_size)
        return x + self.out_proj(z * y), cache

    def decode(self, x: torch.Tensor, cache: RATCache, positions: torch.Tensor) -> torch.Tensor:
        """One token per sequence: x [B, 1, D] at `positions` [B]; updates `cache` in place.

        Static shapes, no host sync: the cache has a slot for every chunk up to its capacity. Three
        launches on the kernels: norm and input projection, the mixing with the output gate
        (ops.rat_decode_mixing), output projection and residual (ops.decode_linear).
        """
        projection = ops.decode_linear(x[:, 0], self.in_proj.weight, self.input_norm.weight, self.input_norm.eps,
                                       kernels=self.kernels)
        z, v, f, q, k = ops.split_projection(projection, self.head_dim, self.ngroups)
        gated = ops.rat_decode_mixing(q, k, v, f, self.gate_bias, cache.summary_k, cache.summary_v, cache.running_k,
                                      cache.running_v, positions, self.chunk_size, self.head_dim, self.rope_base,
                                      kernels=self.kernels, gate=z)
        return ops.decode_linear(gated.unsqueeze(1), self.out_proj.weight, residual=x, kernels=self.kernels)

    def extend(self, x: torch.Tensor, cache: RATCache, start: int) -> torch.Tensor:
        """Continue a prefill with x [B, P, D] at positions start … start + P - 1 of every sequence
        (`start` a multiple of L, so the piece's in-chunk recurrences are its own); its queries attend
        over the cached summaries and the piece's own. Updates `cache` in place. Reference ops only:
        what long prompts need is bounded memory, one piece's activations plus the summaries."""
        if start % self.chunk_size:
            raise ValueError(f"a RAT prefill continues at a chunk start: start {start} is not a multiple "
                             f"of the chunk size {self.chunk_size}")
        B, P, D = x.shape
        L, d, H = self.chunk_size, self.head_dim, self.n_heads
        z, v, f, q, k = self._split(x)
        g = ops.forget_gate(f, self.gate_bias)
        k_state, v_state = ops.chunk_scan(k.repeat(1, 1, H // self.ngroups), g, L), ops.chunk_scan(v, g, L)
        chunk = (start + torch.arange(P, device=x.device)) // L
        cos, sin = ops.rope_cos_sin(chunk, d, self.rope_base, v.dtype)

        def heads(t):
            return t.reshape(B, P, H, d).transpose(1, 2)

        q_rot = ops.apply_rope(heads(q.repeat(1, 1, H // self.ngroups)), cos, sin)
        k_rot, v_own = ops.apply_rope(heads(k_state), cos, sin), heads(v_state)
        first, complete = start // L, P // L  # the piece's first chunk, its complete chunks
        cache.summary_k[:, :, first:first + complete] = k_rot[:, :, L - 1::L][:, :, :complete]
        cache.summary_v[:, :, first:first + complete] = v_own[:, :, L - 1::L][:, :, :complete]
        outputs = []
        for a in range(0, P, QUERY_BLOCK):
            b = min(a + QUERY_BLOCK, P)
            visible = (start + b - 1) // L  # summaries of the chunks before the block's last one
            outputs.append(ops.attend_summaries(q_rot[:, :, a:b], k_rot[:, :, a:b], v_own[:, :, a:b],
                                                cache.summary_k[:, :, :visible], cache.summary_v[:, :, :visible],
                                                chunk[a:b].unsqueeze(0)))
        y = torch.cat(outputs, dim=2).transpose(1, 2).reshape(B, P, D)
        cache.running_k.copy_(k_state[:, -1])
        cache.running_v.copy_(v_state[:, -1])
        return x + self.out_proj(z * y)

    def _mix(self, x: torch.Tensor, documents: Documents | None = None) -> torch.Tensor:
        """Full-sequence forward.

        Recurrences, chunk RoPE, the softmax over summaries + own state and the output gate are one op
        on the input projection (ratpt.ops.rat_mixing), so that the fused Triton kernels take all of it
        and write the projection's gradient directly; they are torch.library custom ops, so a compiled
        block keeps them whole, with no graph break.
        """
        if self.context_shard is not None:
            z, v, f, q, k = self._split(x)
            mixed = self.context_shard.rat_mixing(q, k, v, f, self.gate_bias, self.chunk_size, self.head_dim,
                                                  self.rope_base, kernels=self.kernels,
                                                  positions=None if documents is None else documents.positions)
            return x + self.out_proj(z * mixed)
        gated = ops.rat_mixing(self._projection(x), self.gate_bias, self.chunk_size, self.head_dim, self.ngroups,
                               self.rope_base, kernels=self.kernels,
                               documents=None if documents is None else documents.chunks)
        return x + self.out_proj(gated)

    def _split(self, x: torch.Tensor):
        """sigmoid(z), v, f (gate pre-activation), and q, k of the G groups, from one projection."""
        z, v, f, q, k = ops.split_projection(self._projection(x), self.head_dim, self.ngroups)
        return torch.sigmoid(z), v, f, q, k

    def _projection(self, x: torch.Tensor) -> torch.Tensor:
        """W_in RMSNorm(x): [B, T, 3·D + 2·G·d], the columns z, v, f, q, k (ops.split_projection)."""
        return self.in_proj(self.input_norm(x))
