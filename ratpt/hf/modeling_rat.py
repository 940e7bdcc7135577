"""`RATForCausalLM`: a RAT-family language model as a Hugging Face `PreTrainedModel` (arXiv 2507.04416).

    x = E[tokens];  per block: x = Mixer(x) (pre-norm and residual inside), x = x + FFN(RMSNorm(x))
    logits = RMSNorm(x) · Eᵀ                                     (head tied to the embedding)

Mixer i is `config.mixers[i % len(config.mixers)]`: rat, attention (causal), swa (sliding window) or
rnn. Weight names are ratpt's under `model.`, so ratpt's export converts by a prefix. This file and
its siblings are copied into every exported folder and run there without ratpt: plain PyTorch
(rat_ops.py). When ratpt itself is importable and the tensors are on a GPU, the RAT layer's full
forward and its prefill run ratpt's fused kernels instead (`config.kernels`).

`generate()`: the first forward runs the whole prompt (left padding is moved to the right, so each
sequence is computed as if alone) and returns a `RATCache`; every later forward feeds one token per
sequence against it.
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache_rat import KVState, RATCache, RATLayerState, RNNState, ensure_slots
from .configuration_rat import RATConfig
from .rat_ops import (apply_rope, causal_attention, chunk_scan, forget_gate, rat_attend_states, rat_decode,
                      rat_prefill, rat_states, rope_cos_sin)


def ratpt_ops(x: torch.Tensor, kernels: str):
    """ratpt's op package when it should run the RAT layer's full forward and prefill (ratpt installed, and
    kernels 'auto' on CUDA, or 'triton' anywhere: ratpt then runs its kernels, in Triton's interpreter on the
    CPU), else None: the plain PyTorch of rat_ops."""
    if kernels == "torch" or (kernels == "auto" and not x.is_cuda):
        return None
    try:
        from ratpt import ops
    except ImportError:
        return None
    return ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


class FFN(nn.Module):
    """GELU: fc2(GELU(fc1 x)); SwiGLU: fc1 packs (gate, up)."""

    def __init__(self, config: RATConfig):
        super().__init__()
        hidden = round(config.ffn_mult * config.d_model)
        self.swiglu = config.ffn == "swiglu"
        self.fc1 = nn.Linear(config.d_model, 2 * hidden if self.swiglu else hidden, bias=False)
        self.fc2 = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(h))


class RATMixer(nn.Module):
    """in_proj rows z, v, f, q, k ([D, D, D, G·d, G·d]); out = x + out_proj(sigmoid(z) ⊙ y)."""

    def __init__(self, config: RATConfig):
        super().__init__()
        D, qk = config.d_model, config.ngroups * config.head_dim
        self.d_model, self.head_dim, self.ngroups = D, config.head_dim, config.ngroups
        self.n_heads = D // config.head_dim
        self.chunk_size, self.rope_base, self.kernels = config.chunk_size, config.rope_base, config.kernels
        self.input_norm = RMSNorm(D, config.norm_eps)
        self.in_proj = nn.Linear(D, 3 * D + 2 * qk, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(D))
        self.out_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.in_proj(self.input_norm(x))
        ops = ratpt_ops(x, self.kernels)
        if ops is not None:
            return x + self.out_proj(ops.rat_mixing(proj, self.gate_bias, self.chunk_size, self.head_dim,
                                                    self.ngroups, self.rope_base, kernels=self.kernels))
        z, v, f, q, k = self._split(proj)
        _, k_state, v_state = rat_states(k, v, f, self.gate_bias, self.chunk_size, self.head_dim)
        y = rat_attend_states(q, k_state, v_state, self.chunk_size, self.head_dim, self.rope_base)
        return x + self.out_proj(z * y)

    def prefill(self, x: torch.Tensor, lengths: torch.Tensor, capacity: int) -> tuple[torch.Tensor, RATLayerState]:
        """Forward over right-padded prompts of `lengths`; their chunk summaries and running states."""
        L, d = self.chunk_size, self.head_dim
        z, v, f, q, k = self._split(self.in_proj(self.input_norm(x)))
        ops = ratpt_ops(x, self.kernels)
        prefill = rat_prefill if ops is None else partial(ops.rat_prefill_mixing, kernels=self.kernels)
        y, summary_k, summary_v, running_k, running_v = prefill(q, k, v, f, self.gate_bias, lengths, L, d,
                                                                self.rope_base)
        slots = -(-capacity // L)
        state = RATLayerState(summary_k=ensure_slots(summary_k, slots), summary_v=ensure_slots(summary_v, slots),
                              running_k=running_k, running_v=running_v, chunk_size=L)
        return x + self.out_proj(z * y), state

    def decode(self, x: torch.Tensor, state: RATLayerState, positions: torch.Tensor) -> torch.Tensor:
        z, v, f, q, k = (t[:, 0] for t in self._split(self.in_proj(self.input_norm(x))))
        y = rat_decode(q, k, v, f, self.gate_bias, state.summary_k, state.summary_v, state.running_k,
                       state.running_v, positions, self.chunk_size, self.head_dim, self.rope_base)
        return x + self.out_proj(z * y).unsqueeze(1)

    def _split(self, proj: torch.Tensor):
        qk = self.ngroups * self.head_dim
        z, v, f, q, k = proj.split([self.d_model] * 3 + [qk, qk], dim=-1)
        return torch.sigmoid(z), v, f, q, k


class AttentionMixer(nn.Module):
    """in_proj rows v, q, k (H heads each), RoPE over token positions; `window` W for sliding-window attention."""

    def __init__(self, config: RATConfig, window: int | None = None):
        super().__init__()
        D = config.d_model
        self.d_model, self.head_dim, self.n_heads = D, config.head_dim, D // config.head_dim
        self.window, self.rope_base = window, config.rope_base
        self.input_norm = RMSNorm(D, config.norm_eps)
        self.in_proj = nn.Linear(D, 3 * D, bias=False)
        self.out_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(x)[0]

    def prefill(self, x: torch.Tensor, lengths: torch.Tensor, capacity: int) -> tuple[torch.Tensor, KVState]:
        """Forward over right-padded prompts; (k, v) in `capacity` slots, or the ring of W + 1 of a window."""
        out, k, v = self._mix(x)
        if self.window is None:
            return out, KVState(k=ensure_slots(k, capacity), v=ensure_slots(v.contiguous(), capacity))
        # ring slot s holds the latest position p < length with p = s (mod W + 1)
        slots = torch.arange(self.window + 1, device=x.device)
        held = slots + (self.window + 1) * torch.div(lengths.unsqueeze(-1) - 1 - slots, self.window + 1,
                                                     rounding_mode="floor")
        index = held.clamp(0, x.shape[1] - 1)[:, None, :, None].expand(-1, self.n_heads, -1, self.head_dim)
        return out, KVState(k=k.gather(2, index), v=v.gather(2, index), window=self.window)

    def decode(self, x: torch.Tensor, state: KVState, positions: torch.Tensor) -> torch.Tensor:
        """Write the token's (k, v) to its slot, then attend over every slot written so far."""
        q, k, v = self._qkv(self.in_proj(self.input_norm(x)), positions.unsqueeze(-1), x.dtype)
        slots = state.k.shape[2]
        slot = positions if self.window is None else positions % slots
        rows = torch.arange(x.shape[0], device=x.device)
        state.k[rows, :, slot] = k[:, :, 0].to(state.k.dtype)
        state.v[rows, :, slot] = v[:, :, 0].to(state.v.dtype)
        visible = torch.arange(slots, device=x.device) <= positions.unsqueeze(-1)
        y = F.scaled_dot_product_attention(q, state.k, state.v, attn_mask=visible[:, None, None, :])
        return x + self.out_proj(y.transpose(1, 2).reshape(x.shape))

    def _mix(self, x: torch.Tensor):
        q, k, v = self._qkv(self.in_proj(self.input_norm(x)), torch.arange(x.shape[1], device=x.device), x.dtype)
        y = causal_attention(q, k, v, window=self.window)
        return x + self.out_proj(y.transpose(1, 2).reshape(x.shape)), k, v

    def _qkv(self, h: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
        B, T, _ = h.shape
        v, q, k = (t.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in h.split(self.d_model, -1))
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_base, dtype)
        if cos.dim() == 3:  # per-sequence positions [B, T, d] -> [B, 1, T, d]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class RNNMixer(nn.Module):
    """RAT's gated recurrence over the whole sequence, no attention: in_proj rows z, v, f."""

    def __init__(self, config: RATConfig):
        super().__init__()
        D = config.d_model
        self.d_model = D
        self.input_norm = RMSNorm(D, config.norm_eps)
        self.in_proj = nn.Linear(D, 3 * D, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(D))
        self.out_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, v, g = self._project(x)
        return x + self.out_proj(z * chunk_scan(v, g, chunk_size=None))

    def prefill(self, x: torch.Tensor, lengths: torch.Tensor, capacity: int) -> tuple[torch.Tensor, RNNState]:
        z, v, g = self._project(x)
        state = chunk_scan(v, g, chunk_size=None)
        last = state[torch.arange(x.shape[0], device=x.device), lengths - 1]
        return x + self.out_proj(z * state), RNNState(state=last.to(g.dtype))

    def decode(self, x: torch.Tensor, state: RNNState, positions: torch.Tensor) -> torch.Tensor:
        z, v, g = self._project(x)
        state.state.copy_(g[:, 0] * state.state + (1 - g[:, 0]) * v[:, 0].to(g.dtype))
        return x + self.out_proj(z * state.state.to(x.dtype).unsqueeze(1))

    def _project(self, x: torch.Tensor):
        z, v, f = self.in_proj(self.input_norm(x)).split(self.d_model, dim=-1)
        return torch.sigmoid(z), v, forget_gate(f, self.gate_bias)


def build_mixer(kind: str, config: RATConfig) -> nn.Module:
    if kind == "rat":
        return RATMixer(config)
    if kind in ("attention", "swa"):
        return AttentionMixer(config, window=config.window if kind == "swa" else None)
    return RNNMixer(config)


class RATBlock(nn.Module):
    def __init__(self, config: RATConfig, kind: str):
        super().__init__()
        self.mixer = build_mixer(kind, config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = FFN(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ffn_residual(self.mixer(x))

    def prefill(self, x: torch.Tensor, lengths: torch.Tensor, capacity: int):
        x, state = self.mixer.prefill(x, lengths, capacity)
        return self._ffn_residual(x), state

    def decode(self, x: torch.Tensor, state, positions: torch.Tensor) -> torch.Tensor:
        return self._ffn_residual(self.mixer.decode(x, state, positions))

    def _ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.ffn_norm(x))


class RATPreTrainedModel(PreTrainedModel):
    config_class = RATConfig
    base_model_prefix = "model"
    _no_split_modules = ["RATBlock"]
    _is_stateful = True  # generate() must not build a key/value cache: the model returns its own RATCache

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, init_std) weights, unit norms; gate biases zero (a trained model overwrites them all)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, (RATMixer, RNNMixer)):
            nn.init.zeros_(module.gate_bias)


class RATModel(RATPreTrainedModel):
    """Embedding, blocks and final norm: hidden states, with or without a cache."""

    def __init__(self, config: RATConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(RATBlock(config, config.mixer_of_layer(i)) for i in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding = value

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, RATCache]:
        """Hidden states of right-padded prompts [B, T] of `lengths`, and the cache to decode on from."""
        cache = RATCache(lengths, capacity=tokens.shape[1])
        x = self.embedding(tokens)
        for layer in self.layers:
            x, state = layer.prefill(x, lengths, cache.capacity)
            cache.layers.append(state)
        return self.final_norm(x), cache

    def decode_step(self, tokens: torch.Tensor, cache: RATCache) -> torch.Tensor:
        """Hidden state [B, 1, D] of one more token per sequence [B]; updates the cache in place."""
        cache.reserve_next()
        x = self.embedding(tokens).unsqueeze(1)
        for layer, state in zip(self.layers, cache.layers):
            x = layer.decode(x, state, cache.lengths)
        cache.lengths.add_(1)
        return self.final_norm(x)


class RATForCausalLM(RATPreTrainedModel, GenerationMixin):
    def __init__(self, config: RATConfig):
        super().__init__(config)
        self.model = RATModel(config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loading, except that weights which do not fit the config are an error: transformers
        only warns about missing weights and leaves them random."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as err:
            if "size mismatch" not in str(err):
                raise
            raise ValueError(f"the weights do not fit config.json, which must be the one saved with them: "
                             f"{' '.join(str(err).split())}") from err
        wrong = {kind: keys[:5] for kind, keys in info.items() if kind != "error_msgs" and keys}
        if wrong:
            raise ValueError(f"the weights do not fit config.json, which must be the one saved with them: {wrong}")
        return (model, info) if output_loading_info else model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embedding = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: RATCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast | tuple:
        """Logits [B, T, vocab] (the last `logits_to_keep` positions if > 0) and, with `use_cache`, the cache.

        Without a cache, `attention_mask` may pad either side (each row's ones must be contiguous): left
        padding is moved to the right, so every sequence is computed from its first real token. With a
        cache, `input_ids` are new tokens that every sequence continues with. Arguments of other models
        that this one cannot honour (inputs_embeds, position_ids, output_attentions, output_hidden_states)
        are refused rather than ignored; `cache_position` is ignored: the cache knows each row's position.
        """
        refuse_unsupported(kwargs)
        check_input_ids(input_ids, self.config.vocab_size)
        if labels is not None and (labels.shape != input_ids.shape or logits_to_keep > 0):
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)} and need every "
                             f"position's logits (logits_to_keep 0), got shape {tuple(labels.shape)} and "
                             f"logits_to_keep {logits_to_keep}")
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if past_key_values is not None and not isinstance(past_key_values, RATCache):
            if past_key_values.get_seq_length() > 0:
                raise ValueError(f"RATForCausalLM continues its own RATCache only, not a "
                                 f"{type(past_key_values).__name__}")
            past_key_values = None  # transformers >= 5 gives generate() an empty cache of its own: prefill
        if past_key_values is not None:
            check_cache_fits(past_key_values, input_ids, attention_mask, self.config)
            hidden = torch.cat([self.model.decode_step(input_ids[:, i], past_key_values)
                                for i in range(input_ids.shape[1])], dim=1)
        else:
            starts, lengths = padding_of(input_ids, attention_mask)
            tokens = shift_rows(input_ids, -starts)
            if use_cache:
                hidden, past_key_values = self.model.prefill(tokens, lengths)
            else:
                hidden = self.model(tokens)
            hidden = shift_rows(hidden, starts)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = F.linear(hidden, self.model.embedding.weight.to(hidden.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(),
                                   ignore_index=-100)
        output = CausalLMOutputWithPast(loss=loss, logits=logits,
                                        past_key_values=past_key_values if use_cache else None)
        return output if return_dict else output.to_tuple()


UNSUPPORTED = {
    "inputs_embeds": "it takes input_ids",
    "position_ids": "each row's positions count from its first real token (attention_mask) and the cache",
    "output_attentions": "RAT and RNN layers have no attention weights over tokens",
    "output_hidden_states": "it returns logits only",
}


def refuse_unsupported(kwargs: dict) -> None:
    """ValueError naming the first argument given (not None, not False) that RATForCausalLM cannot honour."""
    for name, why in UNSUPPORTED.items():
        if kwargs.get(name) is not None and kwargs[name] is not False:
            raise ValueError(f"RATForCausalLM does not take {name}: {why}")


def check_input_ids(input_ids: torch.Tensor | None, vocab_size: int) -> None:
    """ValueError unless input_ids are integer token ids below `vocab_size`, at least one per row, [B, T]
    (an id out of range would otherwise be an index error deep in the embedding, on a GPU an assert)."""
    if input_ids is None:
        raise ValueError("RATForCausalLM needs input_ids, token ids [batch, tokens]")
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one of each, got shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}) (config.vocab_size), got ids from {low} to "
                         f"{high}")


def cache_kind(state) -> str:
    """The mixer whose layer state `state` is."""
    if isinstance(state, RATLayerState):
        return "rat"
    if isinstance(state, RNNState):
        return "rnn"
    return "attention" if state.window is None else "swa"


def check_cache_fits(cache: RATCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     config: RATConfig) -> None:
    """ValueError unless `cache` is one of this model's for input_ids' batch, and attention_mask (as generate()
    extends it) marks the new tokens real: a cached sequence cannot skip a token."""
    kinds = [cache_kind(state) for state in cache.layers]
    expected = [config.mixer_of_layer(i) for i in range(config.n_layers)]
    if kinds != expected:
        raise ValueError(f"past_key_values holds the layers {kinds}, not this model's {expected}: it is another "
                         f"model's cache")
    if cache.lengths.shape[0] != input_ids.shape[0]:
        raise ValueError(f"past_key_values holds {cache.lengths.shape[0]} sequences, input_ids "
                         f"{input_ids.shape[0]}")
    if attention_mask is not None and (attention_mask.shape[0] != input_ids.shape[0]
                                       or not bool(attention_mask[:, -input_ids.shape[1]:].bool().all())):
        raise ValueError("attention_mask must mark the new tokens of a cached batch real (its last "
                         "input_ids.shape[1] columns all 1): a sequence continues from each token it is fed")


def padding_of(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first real position, number of real tokens) [B] of each row; ValueError unless its ones are one run."""
    B, T = input_ids.shape
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask is None:
        zeros = torch.zeros(B, dtype=torch.long, device=input_ids.device)
        return zeros, zeros + T
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    starts = mask.long().argmax(-1)
    positions = torch.arange(T, device=mask.device)
    run = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
    if bool((lengths == 0).any()) or not torch.equal(run, mask):
        raise ValueError("attention_mask must mark one run of at least one real token per row (left or right "
                         "padding)")
    return starts, lengths


def shift_rows(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row b of t [B, T, ...] moved right by shift[b] (left if negative) along dim 1; vacated places repeat an
    edge value, which is padding to the model (causal, right of every real token or masked out)."""
    if not bool(shift.any()):
        return t
    T = t.shape[1]
    index = (torch.arange(T, device=t.device) - shift[:, None]).clamp(0, T - 1)
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand_as(t))
