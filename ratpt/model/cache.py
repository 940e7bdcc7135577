"""Per-layer generation caches (DESIGN §1: what each mixer must remember to decode).

Sequences in a batch may have different lengths: `ModelCache.lengths[b]` counts the tokens of
sequence b seen so far, and every layer cache keeps slots beyond a sequence's length as
unread garbage (a prefill over a right-padded batch writes them; decode overwrites a slot
before any query can see it).

- RAT: chunk summaries (rotated k̃, ṽ at each chunk end) [B, H, C, d] plus one running
  (k̃, ṽ) per sequence; C grows as T/L.
- sliding window: a ring of the last W (k, v), slot = position mod W.
- attention: every (k, v).
- RNN: the running state.
"""
from dataclasses import dataclass, field

import torch


@dataclass
class RATCache:
    summary_k: torch.Tensor  # [B, H, capacity, d] rotated k̃ at the end of chunk j (slot j)
    summary_v: torch.Tensor  # [B, H, capacity, d] ṽ at the end of chunk j
    running_k: torch.Tensor  # [B, D] k̃ of the latest token (not rotated), recurrence dtype
    running_v: torch.Tensor  # [B, D] ṽ of the latest token, recurrence dtype


@dataclass
class KVCache:
    k: torch.Tensor  # [B, H, slots, d] rotated keys; attention: slot = position, window: position mod W
    v: torch.Tensor  # [B, H, slots, d] values


@dataclass
class RNNCache:
    state: torch.Tensor  # [B, D] running ṽ, recurrence dtype


LayerCache = RATCache | KVCache | RNNCache


@dataclass
class ModelCache:
    lengths: torch.Tensor  # [B] tokens seen per sequence (= position of the next token)
    layers: list[LayerCache] = field(default_factory=list)  # one per block, in order


def ensure_slots(t: torch.Tensor, needed: int) -> torch.Tensor:
    """Return t [B, H, S, d] grown (doubling) along dim 2 to at least `needed` slots."""
    if t.shape[2] >= needed:
        return t
    grow = max(needed, 2 * t.shape[2]) - t.shape[2]
    return torch.cat((t, t.new_zeros(*t.shape[:2], grow, t.shape[3])), dim=2)


def write_slots(t: torch.Tensor, slots: torch.Tensor, value: torch.Tensor) -> None:
    """t[b, :, slots[b]] = value[b] for every sequence b; t [B, H, S, d], value [B, H, d]."""
    t[torch.arange(t.shape[0], device=t.device), :, slots] = value.to(t.dtype)


def gather_positions(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """t[b, positions[b]] for t [B, T, ...] and positions [B]: each sequence's own last token."""
    return t[torch.arange(t.shape[0], device=t.device), positions]
