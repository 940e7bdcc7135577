"""The RAT-family language model (docs/design.md#the-language-model, as the paper's code).

    x = E[tokens]                       (no scaling)
    per block i:  x = Mixer_i(x)        (the mixer owns its pre-norm and residual)
                  x = x + FFN(RMSNorm(x))
    logits = RMSNorm(x) · Eᵀ            (head tied to the embedding)

Mixer i is `cfg.mixers[i % len(cfg.mixers)]`, so ["rat", "swa"] is the paper's hybrid. Packed documents
that do not see each other are given as `positions` [B, T], each token's position in its document
(docs/design.md#packed-documents); every mixer keeps them apart, and everything else is per token.
Plain PyTorch, no distributed code: parallelism is applied to this module from outside.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ratpt import ops
from ratpt.model.attention import AttentionMixer
from ratpt.model.cache import LayerCache, ModelCache
from ratpt.model.config import ModelConfig, mixer_of_layer, validate_model_config
from ratpt.model.ffn import FFN
from ratpt.model.norm import RMSNorm
from ratpt.model.rat import RATMixer
from ratpt.model.rnn import RNNMixer
from ratpt.ops.document_attention import document_block_mask
from ratpt.ops.documents import Documents
from ratpt.ops.linear_cross_entropy import linear_cross_entropy_sum
from ratpt.ops.sliding_window_attention import flex_runs

Mixer = RATMixer | AttentionMixer | RNNMixer


def build_mixer(kind: str, cfg: ModelConfig) -> Mixer:
    """The sequence mixer named `kind` (one of config.MIXERS)."""
    if kind == "rat":
        return RATMixer(cfg)
    if kind == "attention":
        return AttentionMixer(cfg)
    if kind == "swa":
        return AttentionMixer(cfg, window=cfg.window)
    if kind == "rnn":
        return RNNMixer(cfg)
    raise ValueError(f"unknown mixer {kind!r}")


def packed_documents(positions: torch.Tensor | None, layers) -> Documents | None:
    """What `layers` read of the packed documents in `positions` (None: one document per row), built once for
    all of them in each forward: RAT's chunk table (one host sync), FlexAttention's block mask of each window
    where it runs. Mixers under context parallelism read only the positions."""
    mixers = [layer.mixer for layer in layers]
    rat = [m for m in mixers if isinstance(m, RATMixer) and m.context_shard is None]
    documents = ops.separate_documents(positions, rat[0].chunk_size if rat else None)
    if documents is not None and flex_runs(positions):
        for window in {m.window for m in mixers if isinstance(m, AttentionMixer) and m.context_shard is None}:
            documents.block_masks[window] = document_block_mask(positions, window)
    return documents


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.mixer = build_mixer(kind, cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FFN(cfg)

    def forward(self, x: torch.Tensor, documents: Documents | None = None) -> torch.Tensor:
        return self._ffn_residual(self.mixer(x, documents))

    def prefill(self, x: torch.Tensor, lengths: torch.Tensor, capacity: int) -> tuple[torch.Tensor, LayerCache]:
        x, cache = self.mixer.prefill(x, lengths, capacity)
        return self._ffn_residual(x), cache

    def decode(self, x: torch.Tensor, cache: LayerCache, positions: torch.Tensor) -> torch.Tensor:
        return self.ffn.decode(self.mixer.decode(x, cache, positions), self.ffn_norm)

    def extend(self, x: torch.Tensor, cache: LayerCache, start: int) -> torch.Tensor:
        return self._ffn_residual(self.mixer.extend(x, cache, start))

    def _ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.ffn_norm(x))


class RATLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, mixer_of_layer(cfg, i)) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.loss_compile_backend = None  # the fused loss's chunk math through torch.compile (train.compile sets it)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for embedding and linear weights, ones for norms, chrono gates."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, (RATMixer, RNNMixer)):
                module.reset_gate_bias()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T], in the dtype of the computation; given labels [B, T],
        the summed fp32 cross-entropy instead, head and loss fused so that the logits never exist whole.
        `positions` [B, T]: each token's position in its packed document (None: one document per row)."""
        hidden = self.hidden_states(tokens, positions)
        if labels is None:
            return self.logits(hidden)
        return linear_cross_entropy_sum(hidden, self.embedding.weight, labels,
                                        compile_backend=self.loss_compile_backend)

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, D]: a loss can be fused with `logits` from here."""
        documents = packed_documents(positions, self.layers)  # one document per row: exactly the unmasked path
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x, documents)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied head: hidden · Eᵀ."""
        return F.linear(hidden, self.embedding.weight.to(hidden.dtype))

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, capacity: int | None = None
                ) -> tuple[torch.Tensor, ModelCache]:
        """Run right-padded prompts [B, T] of `lengths` [B]; return each one's next-token logits
        [B, vocab] and the cache to continue with `decode_step`.

        `capacity` (>= T): tokens per sequence, prompt included, the cache is preallocated for.
        With it every decode step has static shapes and no host sync (CUDA-graph safe) and
        decoding past it is refused; without it the cache grows as decoding goes on.
        """
        B, T = tokens.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=tokens.device)
        if int(lengths.min()) < 1 or int(lengths.max()) > T:
            raise ValueError(f"prompt lengths must be in [1, {T}], got {lengths.tolist()}")
        if capacity is not None and capacity < T:
            raise ValueError(f"capacity ({capacity}) must hold the prompts ({T} tokens)")
        cache = ModelCache(lengths=lengths.clone(), capacity=capacity or T, static=capacity is not None, bound=T)
        x = self.embedding(tokens)
        for layer in self.layers:
            x, layer_cache = layer.prefill(x, lengths, cache.capacity)
            cache.layers.append(layer_cache)
        last = x[torch.arange(B, device=x.device), lengths - 1]
        return self.logits(self.final_norm(last)), cache

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """Continue a static cache of equal-length sequences with tokens [B, P]; return the next-token
        logits [B, vocab] after the last of them. Prefilling a long prompt piece by piece this way bounds
        memory by one piece's activations plus the cache (RAT: pieces after the first start a chunk)."""
        start = cache.bound
        if not cache.static or int(cache.lengths.min()) != start or int(cache.lengths.max()) != start:
            raise ValueError("extend continues a cache prefilled with an explicit capacity from prompts of "
                             "equal length (prefill(tokens, capacity=...))")
        if start + tokens.shape[1] > cache.capacity:
            raise ValueError(f"the cache holds {cache.capacity} tokens per sequence; {start} + "
                             f"{tokens.shape[1]} do not fit: prefill with a larger capacity")
        x = self.embedding(tokens)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer.extend(x, layer_cache, start)
        cache.lengths.add_(tokens.shape[1])
        cache.bound += tokens.shape[1]
        return self.logits(self.final_norm(x[:, -1]))

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """Feed one token per sequence [B]; return next-token logits [B, vocab]; updates cache in
        place (a static cache: same tensors, no host sync, so the step can be CUDA-graphed)."""
        cache.reserve_next()
        positions = cache.lengths
        x = self.embedding(tokens).unsqueeze(1)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer.decode(x, layer_cache, positions)
        cache.lengths.add_(1)
        return ops.decode_linear(x[:, 0], self.embedding.weight, self.final_norm.weight, self.final_norm.eps,
                                 kernels=self.cfg.kernels)


def build_model(cfg: ModelConfig) -> RATLM:
    """A freshly initialised model for `cfg` (validated; raises ValueError naming a bad field)."""
    return RATLM(cfg)
