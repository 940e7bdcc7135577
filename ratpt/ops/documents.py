"""Packed documents that do not see each other (docs/design.md#packed-documents).

A batch of packed sequences describes its documents by `positions` [B, T]: each token's position in its
document, 0 at a document's first token and one more at each next token; every row starts a document. It has
the tokens' shape, so it stacks over a batch and is cut along the sequence with them, and each op reads what it
needs from it: document ids for attention masks, resets for the recurrences, RoPE positions, and RAT's chunks,
which restart at every document start (`DocumentChunks`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def separate_documents(positions: torch.Tensor | None) -> torch.Tensor | None:
    """`positions` if some row packs more than one document, else None: a batch of one document per row takes
    exactly the unmasked path. One host sync (call it once per forward, not per layer)."""
    if positions is None:
        return None
    starts = positions == 0
    if not bool(starts[:, 0].all()):
        raise ValueError("positions must be 0 at every sequence's first token (each row starts a document); "
                         f"got first positions {positions[:, 0].tolist()}")
    return positions if bool(starts[:, 1:].any()) else None


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """[B, T]: the index of each token's document in its row (equal ids = the same document)."""
    return torch.cumsum(positions == 0, dim=1)


@dataclass
class DocumentChunks:
    """RAT's chunks over packed documents: every document is padded to whole chunks of L, so that its first
    chunk begins at its first token, and the sequence is laid out as C chunks of L slots (the padding after a
    document's last token is zeros, read by no query of any document).

    slot [B, T]: each token's slot in the padded sequence; first_chunk [B, C·L]: for each slot, the chunk
    where its document starts (its chunk index in the document is then chunk − first_chunk)."""

    slot: torch.Tensor
    first_chunk: torch.Tensor

    @classmethod
    def of(cls, positions: torch.Tensor, chunk_size: int) -> DocumentChunks:
        L = chunk_size
        chunk = torch.cumsum(positions % L == 0, dim=1) - 1  # each token's chunk in the padded sequence
        n_chunks = int(chunk[:, -1].max()) + 1  # a host sync: the padded length depends on the documents
        first = torch.arange(n_chunks, device=positions.device).expand(positions.shape[0], -1)
        first = first.scatter(1, chunk, chunk - positions // L)  # chunks without tokens (a shorter row's tail): own
        return cls(slot=chunk * L + positions % L, first_chunk=first.repeat_interleave(L, dim=1))

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, C·L, D], zeros in the padding."""
        B, T, D = t.shape
        padded = _PlaceRows.apply(t.reshape(B * T, D), self._rows(), B * self.first_chunk.shape[1])
        return padded.view(B, -1, D)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """[B, C·L, D] -> [B, T, D]: the tokens' slots."""
        B, _, D = t.shape
        return _TakeRows.apply(t.reshape(-1, D), self._rows()).view(B, -1, D)

    def _rows(self) -> torch.Tensor:
        """Each token's row in the padded batch flattened to [B·C·L, D]."""
        B, padded = self.first_chunk.shape
        return (self.slot + padded * torch.arange(B, device=self.slot.device).unsqueeze(1)).flatten()


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
