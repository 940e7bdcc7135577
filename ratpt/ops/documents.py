"""Packed documents that do not see each other (docs/design.md#packed-documents).

A batch of packed sequences describes its documents by `positions` [B, T]: each token's position in its
document, 0 at a document's first token and one more at each next token; every row starts a document. It has
the tokens' shape, so it stacks over a batch and is cut along the sequence with them, and each op reads what it
needs from it: document ids for attention masks, resets for the recurrences, RoPE positions, and RAT's chunks,
which restart at every document start (`DocumentChunks`). A model derives what its layers read once per
forward (`Documents`), not in every layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The chunk table's width C is rounded up to a multiple of this: the chunks past a row's end are empty (cheap in
# the kernels), and a compiled block then sees a few widths, not one per batch (a graph each).
CHUNKS_MULTIPLE = 16


@dataclass
class Documents:
    """One batch's packed documents as the layers of one forward read them: `positions` [B, T]; `chunks`, RAT's
    chunk table at the model's chunk size (None in a model without RAT layers); `block_masks`, FlexAttention's
    document block mask by window (ratpt.ops.document_attention, built where FlexAttention runs)."""

    positions: torch.Tensor
    chunks: DocumentChunks | None = None
    block_masks: dict = field(default_factory=dict)


def separate_documents(positions: torch.Tensor | None, chunk_size: int | None = None) -> Documents | None:
    """The documents of `positions` if some row packs more than one, else None: a batch of one document per row
    takes exactly the unmasked path. With `chunk_size`, RAT's chunk table too. Host syncs: call it once per
    forward, not per layer."""
    if positions is None:
        return None
    starts = positions == 0
    if not bool(starts[:, 0].all()):
        raise ValueError("positions must be 0 at every sequence's first token (each row starts a document); "
                         f"got first positions {positions[:, 0].tolist()}")
    if not bool(starts[:, 1:].any()):
        return None
    return Documents(positions, None if chunk_size is None else DocumentChunks.of(positions, chunk_size))


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """[B, T]: the index of each token's document in its row (equal ids = the same document)."""
    return torch.cumsum(positions == 0, dim=1)


@dataclass
class DocumentChunks:
    """RAT's chunks over packed documents: every document cut into chunks of L from its first token (its last
    chunk shorter), numbered in order along the row, C of them in the longest row.

    start [B, C] (int32): each chunk's first token (T for the chunks past a shorter row's end); a chunk ends where
    the next one starts. first_chunk [B, C] (int32): the chunk where each chunk's document starts (its chunk
    index in the document is then its own less that). The Triton kernels read the tokens in place through this
    table. slot [B, T]: each token's slot in the same chunks padded to L slots each, the reference's layout
    (`pad`, `unpad`; the padding is zeros, read by no query of any document).

    `of` syncs with the host (C depends on the documents, rounded up to a multiple of CHUNKS_MULTIPLE): a model
    builds it once per forward (Documents)."""

    chunk_size: int
    slot: torch.Tensor
    start: torch.Tensor
    first_chunk: torch.Tensor

    @classmethod
    def of(cls, positions: torch.Tensor, chunk_size: int) -> DocumentChunks:
        L, (B, T) = chunk_size, positions.shape
        chunk = torch.cumsum(positions % L == 0, dim=1) - 1  # each token's chunk
        n_chunks = -(-(int(chunk[:, -1].max()) + 1) // CHUNKS_MULTIPLE) * CHUNKS_MULTIPLE
        own = torch.arange(n_chunks, device=positions.device).expand(B, -1)
        first = own.scatter(1, chunk, chunk - positions // L)  # chunks without tokens (a shorter row's tail): own
        tokens = torch.arange(T, device=positions.device).expand(B, -1)
        start = torch.full_like(own, T).scatter_reduce(1, chunk, tokens, "amin")
        return cls(chunk_size=L, slot=chunk * L + positions % L, start=start.int(), first_chunk=first.int())

    def slot_first_chunk(self) -> torch.Tensor:
        """[B, C·L]: first_chunk of each slot of the padded layout."""
        return self.first_chunk.long().repeat_interleave(self.chunk_size, dim=1)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, C·L, D], zeros in the padding."""
        B, T, D = t.shape
        padded = _PlaceRows.apply(t.reshape(B * T, D), self._rows(), B * self._slots())
        return padded.view(B, -1, D)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """[B, C·L, D] -> [B, T, D]: the tokens' slots."""
        B, _, D = t.shape
        return _TakeRows.apply(t.reshape(-1, D), self._rows()).view(B, -1, D)

    def _slots(self) -> int:
        return self.first_chunk.shape[1] * self.chunk_size

    def _rows(self) -> torch.Tensor:
        """Each token's row in the padded batch flattened to [B·C·L, D]."""
        return (self.slot + self._slots() * torch.arange(self.slot.shape[0], device=self.slot.device).unsqueeze(1)
                ).flatten()


class _PlaceRows(torch.autograd.Function):
    """x's rows placed at distinct `rows` of n zero rows. The rows being distinct, the backward is a plain
    row gather and the forward a row copy: no atomics and no per-element index, unlike scatter/gather
    with an index expanded over the feature dimension."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return x.new_zeros(n, x.shape[1]).index_copy_(0, rows, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return grad.index_select(0, rows), None, None


class _TakeRows(torch.autograd.Function):
    """The distinct `rows` of x; the backward places the gradient back in zeros (_PlaceRows' forward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.n = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return grad.new_zeros(ctx.n, grad.shape[1]).index_copy_(0, rows, grad), None
