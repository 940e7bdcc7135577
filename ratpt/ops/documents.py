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
        B, _, D = t.shape
        return t.new_zeros(B, self.first_chunk.shape[1], D).scatter(1, self.slot.unsqueeze(-1).expand(-1, -1, D), t)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """[B, C·L, D] -> [B, T, D]: the tokens' slots."""
        return t.gather(1, self.slot.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
