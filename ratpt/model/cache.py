"""Per-layer generation caches (docs/design.md#generation-and-its-caches: what each mixer must remember to decode).

Sequences in a batch may have different lengths: `ModelCache.lengths[b]` counts the tokens of
sequence b seen so far, and every layer cache keeps slots beyond a sequence's length as
unread garbage (a prefill over a right-padded batch writes them; decode overwrites a slot
before any query can see it).

Every cache is preallocated for `capacity` tokens per sequence, so a decode step has static
shapes, updates its tensors in place and never waits for the device: it can be captured once
in a CUDA graph and replayed per token. A cache prefilled with an explicit capacity (`static`)
refuses to grow; one prefilled without grows its slots by doubling, on the host, between steps.

- RAT: chunk summaries (rotated k̃, ṽ at each chunk end) [B, H, ceil(capacity / L), d] plus one
  running (k̃, ṽ) per sequence; the slot of the current chunk holds its latest state.
- sliding window: a ring of the last W + 1 (k, v) (the token itself and the W before it),
  slot = position mod (W + 1).
- attention: every (k, v), slot = position.
- RNN: the running state.
"""
import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class RATCache:
    summary_k: torch.Tensor  # [B, H, slots, d] rotated k̃ at the end of chunk j (slot j)
    summary_v: torch.Tensor  # [B, H, slots, d] ṽ at the end of chunk j
    running_k: torch.Tensor  # [B, D] k̃ of the latest token (not rotated), recurrence dtype
    running_v: torch.Tensor  # [B, D] ṽ of the latest token, recurrence dtype
    chunk_size: int

    def grow(self, capacity: int) -> None:
        slots = summary_slots(capacity, self.chunk_size)
        self.summary_k = ensure_slots(self.summary_k, slots)
        self.summary_v = ensure_slots(self.summary_v, slots)


@dataclass
class KVCache:
    k: torch.Tensor  # [B, H, slots, d] rotated keys; attention: slot = position, window: position mod (W + 1)
    v: torch.Tensor  # [B, H, slots, d] values
    window: int | None = None  # W of a sliding window (a ring of W + 1 slots), None for full attention

    def grow(self, capacity: int) -> None:
        if self.window is None:
            self.k = ensure_slots(self.k, capacity)
            self.v = ensure_slots(self.v, capacity)


@dataclass
class RNNCache:
    state: torch.Tensor  # [B, D] running ṽ, recurrence dtype

    def grow(self, capacity: int) -> None:
        """The state does not depend on the length."""


LayerCache = RATCache | KVCache | RNNCache


@dataclass
class ModelCache:
    lengths: torch.Tensor  # [B] tokens seen per sequence (= position of the next token), updated in place
    capacity: int  # tokens per sequence the layer caches have room for
    static: bool  # True: capacity fixed at prefill (shapes never change); False: grows on demand
    bound: int  # host-side bound on max(lengths): the padded prompt length plus the decode steps so far
    layers: list[LayerCache] = field(default_factory=list)  # one per block, in order

    def reserve_next(self) -> None:
        """Make room for one more token per sequence, from host-side counts only (no device sync)."""
        self.bound += 1
        if self.bound <= self.capacity:
            return
        if self.static:
            raise ValueError(f"the cache was prefilled with capacity {self.capacity} tokens per sequence; "
                             f"decoding token {self.bound} needs a larger capacity at prefill")
        self.capacity = max(self.bound, 2 * self.capacity)
        for layer in self.layers:
            layer.grow(self.capacity)

    def load_(self, other: "ModelCache") -> None:
        """Take in `other`'s n sequences as rows 0 … n − 1, in place, and restart the rows after them at
        position 0: a persistent cache (the one a CUDA graph was captured on) continues new prompts.
        Both caches are static with the same capacity; the rows after n decode unread padding."""
        n = other.lengths.shape[0]
        if not (self.static and other.static and self.capacity == other.capacity and n <= self.lengths.shape[0]):
            raise ValueError(f"a cache of {other.lengths.shape[0]} sequences with capacity {other.capacity} does not "
                             f"fit a persistent cache of {self.lengths.shape[0]} with capacity {self.capacity}: "
                             f"prefill with capacity={self.capacity} and at most {self.lengths.shape[0]} prompts")
        self.lengths[:n].copy_(other.lengths)
        self.lengths[n:] = 0
        self.bound = other.bound
        for mine, theirs in zip(self.layers, other.layers):
            for name, tensor in _tensors(mine).items():
                tensor[:n].copy_(getattr(theirs, name))

    def repeat_interleave(self, n: int) -> "ModelCache":
        """A cache of n copies of each sequence in a row (b -> rows b·n … b·n + n - 1), e.g. to draw
        n samples per prompt from one prefill."""
        return dataclasses.replace(self, lengths=self.lengths.repeat_interleave(n, 0),
                                   layers=[_repeat_rows(layer, n) for layer in self.layers])


def _repeat_rows(layer: LayerCache, n: int) -> LayerCache:
    return dataclasses.replace(layer, **{name: t.repeat_interleave(n, 0) for name, t in _tensors(layer).items()})


def _tensors(layer: LayerCache) -> dict[str, torch.Tensor]:
    """A layer cache's tensor fields by name (every one has the batch as its first dim)."""
    return {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)
            if isinstance(getattr(layer, f.name), torch.Tensor)}


def summary_slots(capacity: int, chunk_size: int) -> int:
    """Chunk-summary slots for `capacity` tokens: one per chunk, the last one possibly partial."""
    return -(-capacity // chunk_size)


def ensure_slots(t: torch.Tensor, needed: int) -> torch.Tensor:
    """t [B, H, S, d] itself if S >= needed, else a copy with zero slots appended up to `needed`."""
    if t.shape[2] >= needed:
        return t
    out = t.new_zeros(*t.shape[:2], needed, t.shape[3])
    out[:, :, :t.shape[2]] = t
    return out


def write_slots(t: torch.Tensor, slots: torch.Tensor, value: torch.Tensor) -> None:
    """t[b, :, slots[b]] = value[b] for every sequence b; t [B, H, S, d], value [B, H, d]. In place."""
    t[torch.arange(t.shape[0], device=t.device), :, slots] = value.to(t.dtype)


def gather_positions(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """t[b, positions[b]] for t [B, T, ...] and positions [B]: each sequence's own last token."""
    return t[torch.arange(t.shape[0], device=t.device), positions]
