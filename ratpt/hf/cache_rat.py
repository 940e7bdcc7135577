"""`RATCache`: what a RAT-family model remembers between `generate()` steps, per layer.

- RAT: the chunk summaries (rotated k̃, ṽ at each chunk's end) [B, H, ceil(capacity / L), d] and one
  running (k̃, ṽ) per sequence. This is the whole point of RAT: the cache grows by one summary per L
  tokens, not one (k, v) per token.
- sliding window: a ring of the last W + 1 (k, v), slot = position mod (W + 1); never grows.
- attention: every (k, v), slot = position.
- RNN: the running state; never grows.

Sequences of a batch may be at different positions (`lengths`); slots beyond a sequence's length hold
garbage that no query reads. Slots are preallocated and grow by doubling, on the host, between steps.
"""
from dataclasses import dataclass, fields

import torch


@dataclass
class RATLayerState:
    summary_k: torch.Tensor  # [B, H, slots, d] rotated k̃ at the end of chunk j (slot j; the current chunk's latest)
    summary_v: torch.Tensor  # [B, H, slots, d] ṽ likewise
    running_k: torch.Tensor  # [B, H·d] k̃ of the latest token, not rotated, fp32
    running_v: torch.Tensor  # [B, H·d] ṽ of the latest token, fp32
    chunk_size: int

    def grow(self, capacity: int) -> None:
        slots = -(-capacity // self.chunk_size)
        self.summary_k, self.summary_v = ensure_slots(self.summary_k, slots), ensure_slots(self.summary_v, slots)


@dataclass
class KVState:
    k: torch.Tensor  # [B, H, slots, d] rotated keys: slot = position, or position mod (W + 1) in a window
    v: torch.Tensor  # [B, H, slots, d]
    window: int | None = None

    def grow(self, capacity: int) -> None:
        if self.window is None:
            self.k, self.v = ensure_slots(self.k, capacity), ensure_slots(self.v, capacity)


@dataclass
class RNNState:
    state: torch.Tensor  # [B, D] running ṽ, fp32

    def grow(self, capacity: int) -> None:
        """The state does not depend on the length."""


LayerState = RATLayerState | KVState | RNNState


class RATCache:
    """Per-layer states of a batch of sequences, `lengths` [B] tokens seen by each."""

    def __init__(self, lengths: torch.Tensor, capacity: int):
        self.lengths = lengths.clone()
        self.capacity = capacity  # tokens per sequence the layer states have slots for
        self.bound = capacity  # host-side max(lengths) (no device sync): the prompt length plus the steps since
        self.layers: list[LayerState] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by the longest sequence (what generate() asks of a cache passed in)."""
        return self.bound

    def reserve_next(self) -> None:
        """Make room for one more token per sequence: double the slots when they run out."""
        self.bound += 1
        if self.bound > self.capacity:
            self.capacity = max(self.bound, 2 * self.capacity)
            for layer in self.layers:
                layer.grow(self.capacity)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep the rows `beam_idx` (beam search)."""
        self.lengths = self.lengths.index_select(0, beam_idx.to(self.lengths.device))
        for layer in self.layers:
            for f in fields(layer):
                value = getattr(layer, f.name)
                if isinstance(value, torch.Tensor):
                    setattr(layer, f.name, value.index_select(0, beam_idx.to(value.device)))

    def nbytes(self) -> int:
        """Bytes held by the layer states."""
        return sum(getattr(layer, f.name).nbytes for layer in self.layers for f in fields(layer)
                   if isinstance(getattr(layer, f.name), torch.Tensor))


def ensure_slots(t: torch.Tensor, needed: int) -> torch.Tensor:
    """t [B, H, S, d] itself if S >= needed, else a copy with zero slots appended up to `needed`."""
    if t.shape[2] >= needed:
        return t
    out = t.new_zeros(*t.shape[:2], needed, t.shape[3])
    out[:, :, :t.shape[2]] = t
    return out
