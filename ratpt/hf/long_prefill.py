"""Prefill in pieces: a prompt of any length on one GPU, for long-context evaluation.

`RATLM.prefill` runs the whole prompt through each layer at once, so its transient activations (the
projections, fp32 recurrences, FFN hidden states) grow with the prompt. `prefill_in_pieces` prefills the
first `piece` tokens (preallocating the cache for the whole prompt and the answer), then continues the
cache piece by piece with `RATLM.extend`; memory is then the cache (for RAT one summary per L tokens)
plus one piece's activations, and the result is the one-shot prefill's up to floating-point order.
"""
import torch

from ratpt.model.cache import ModelCache
from ratpt.model.lm import RATLM

PIECE = 8192  # tokens per piece of a long prompt: a multiple of every power-of-two chunk size up to 8192


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
        logits = model.extend(tokens[:, start:start + piece], cache)
    return logits, cache


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
