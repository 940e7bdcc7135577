"""Prefill in pieces: a prompt of any length on one GPU, for long-context evaluation.

`RATLM.prefill` runs the whole prompt through each layer at once, so its transient activations (the
projections, fp32 recurrences, FFN hidden states) grow with the prompt. `prefill_in_pieces` runs the
first `piece` tokens through `RATLM.prefill` (preallocating the cache for the whole prompt and the answer),
then every later piece through all layers against the cache the earlier pieces left:

- RAT: the piece starts a chunk (`piece` is a multiple of L), so its in-chunk recurrences are its own; its
  queries attend over the cached summaries and the piece's own, rotated by the global chunk index.
- attention: the piece's (k, v) go to their slots; its queries see every earlier slot.
- sliding window: the ring gives the W keys before the piece; the piece's last W + 1 refill it.
- RNN: the scan continues from the cached state.

Memory is then the cache (for RAT one summary per L tokens) plus one piece's activations. The result is
the one-shot prefill's up to floating-point order (tests/hf/test_long_prefill.py). The mixers' own
projections are reused so that the weights' meaning stays in ratpt/model; only the continuation is here.
"""
import torch
import torch.nn.functional as F

from ratpt import ops
from ratpt.model.attention import AttentionMixer
from ratpt.model.cache import KVCache, ModelCache, RATCache, RNNCache
from ratpt.model.lm import RATLM
from ratpt.model.rat import RATMixer
from ratpt.model.rnn import RNNMixer

PIECE = 8192  # tokens per piece of a long prompt: a multiple of every power-of-two chunk size up to 8192
QUERY_BLOCK = 512  # queries per attention block inside a piece (bounds the score matrices)


@torch.no_grad()
def prefill_in_pieces(model: RATLM, tokens: torch.Tensor, capacity: int, piece: int = PIECE
                      ) -> tuple[torch.Tensor, ModelCache]:
    """`model.prefill(tokens, capacity=capacity)` for prompts [B, T] of equal length, `piece` tokens at a
    time: the last token's logits [B, vocab] and a static cache for `decode_step`."""
    T = tokens.shape[1]
    if piece < 1 or piece % model.cfg.chunk_size:
        raise ValueError(f"piece (--piece) {piece} must be a positive multiple of the chunk size "
                         f"{model.cfg.chunk_size}, so that every piece after the first starts a chunk")
    if capacity < T:
        raise ValueError(f"capacity ({capacity}) must hold the prompt ({T} tokens)")
    logits, cache = model.prefill(tokens[:, :piece], capacity=capacity)
    for start in range(piece, T, piece):
        x = model.embedding(tokens[:, start:start + piece])
        for block, layer_cache in zip(model.layers, cache.layers):
            x = extend(block.mixer, x, layer_cache, start)
            x = block._ffn_residual(x)
        cache.lengths.add_(x.shape[1])
        cache.bound += x.shape[1]
        logits = model.logits(model.final_norm(x[:, -1]))
    return logits, cache


def extend(mixer: RATMixer | AttentionMixer | RNNMixer, x: torch.Tensor, cache: RATCache | KVCache | RNNCache,
           start: int) -> torch.Tensor:
    """The mixer's output for x [B, P, D] at positions start … start + P - 1, given the cache of the
    tokens before `start`; updates the cache in place."""
    if isinstance(mixer, RATMixer):
        return _extend_rat(mixer, x, cache, start)
    if isinstance(mixer, AttentionMixer):
        return _extend_attention(mixer, x, cache, start)
    return _extend_rnn(mixer, x, cache)


def _extend_rat(mixer: RATMixer, x: torch.Tensor, cache: RATCache, start: int) -> torch.Tensor:
    B, P, D = x.shape
    L, d, H = mixer.chunk_size, mixer.head_dim, mixer.n_heads
    z, v, f, q, k = mixer._split(x)
    g = ops.forget_gate(f, mixer.gate_bias)
    k_state, v_state = ops.chunk_scan(k.repeat(1, 1, H // mixer.ngroups), g, L), ops.chunk_scan(v, g, L)
    chunk = (start + torch.arange(P, device=x.device)) // L
    cos, sin = ops.rope_cos_sin(chunk, d, mixer.rope_base, v.dtype)

    def heads(t):
        return t.reshape(B, P, H, d).transpose(1, 2)

    q_rot = ops.apply_rope(heads(q.repeat(1, 1, H // mixer.ngroups)), cos, sin)
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
    return x + mixer.out_proj(z * y)


def _extend_attention(mixer: AttentionMixer, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
    P, W = x.shape[1], mixer.window
    positions = start + torch.arange(P, device=x.device)
    q, k, v = mixer._qkv(mixer.in_proj(mixer.input_norm(x)), positions, x.dtype)
    if W is None:  # every earlier key is in its slot
        cache.k[:, :, start:start + P], cache.v[:, :, start:start + P] = k, v
        first, keys, values = 0, cache.k, cache.v
    else:  # the W positions before the piece, read from the ring, then the piece's own
        first = max(0, start - W)
        ring = torch.arange(first, start, device=x.device) % (W + 1)
        keys, values = torch.cat((cache.k[:, :, ring], k), dim=2), torch.cat((cache.v[:, :, ring], v), dim=2)
        n = min(W + 1, start + P - first)  # the ring after the piece: its last W + 1 positions
        kept = torch.arange(start + P - n, start + P, device=x.device) % (W + 1)
        cache.k[:, :, kept], cache.v[:, :, kept] = keys[:, :, -n:], values[:, :, -n:]
    outputs = []
    for a in range(0, P, QUERY_BLOCK):
        b = min(a + QUERY_BLOCK, P)
        low = first if W is None else max(first, start + a - W)  # the earliest position the block may see
        key_pos = torch.arange(low, start + b, device=x.device)
        allowed = key_pos <= positions[a:b, None]
        if W is not None:
            allowed &= positions[a:b, None] - key_pos <= W
        outputs.append(F.scaled_dot_product_attention(q[:, :, a:b], keys[:, :, low - first:start + b - first],
                                                      values[:, :, low - first:start + b - first], attn_mask=allowed))
    return x + mixer.out_proj(mixer._merge(torch.cat(outputs, dim=2)))


def _extend_rnn(mixer: RNNMixer, x: torch.Tensor, cache: RNNCache) -> torch.Tensor:
    z, v, g = mixer._project(x)
    # the cached state as step 0 of the scan: y[0] = state, y[t] = g[t]·y[t-1] + (1 - g[t])·v[t]
    u = torch.cat((cache.state.unsqueeze(1), (1 - g) * v.to(g.dtype)), dim=1)
    state = ops.linear_scan(torch.cat((g[:, :1], g), dim=1), u)[:, 1:]
    cache.state.copy_(state[:, -1])
    return x + mixer.out_proj(z * state.to(x.dtype))


@torch.inference_mode()
def greedy_answer(model: RATLM, prompt: list[int], max_new_tokens: int, eos_id: int | None = None,
                  piece: int = PIECE) -> list[int]:
    """`ratpt.generate`'s greedy continuation of one prompt (up to and including eos_id), its prefill in
    pieces: what `ratpt evaluate-long` asks the model."""
    tokens = torch.tensor([prompt], device=next(model.parameters()).device)
    logits, cache = prefill_in_pieces(model, tokens, capacity=len(prompt) + max_new_tokens, piece=piece)
    new: list[int] = []
    while True:
        token = logits.argmax(-1)
        new.append(int(token))
        if new[-1] == eos_id or len(new) == max_new_tokens:
            return new
        logits = model.decode_step(token, cache)
