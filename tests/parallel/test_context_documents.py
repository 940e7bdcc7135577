"""The chunk tables that RAT's kernels read under context parallelism over packed documents
(ratpt.parallel.context_rat_kernels.DocumentBlocks), against the whole rows' chunks: every token of a
block in exactly one of its chunks, each chunk whole and numbered as in the row, each summary owned by
exactly one block of all the ranks. The numerics are checked end to end in test_layouts.py."""
import pytest
import torch

from ratpt.ops.documents import DocumentChunks
from ratpt.parallel.context_blocks import ContextLayout
from ratpt.parallel.context_rat_kernels import DocumentBlocks

L = 8


def packed_positions(lengths_per_row: list[list[int]]) -> torch.Tensor:
    rows = [torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_row]
    assert len({len(r) for r in rows}) == 1
    return torch.stack(rows)


def row_chunks(positions: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per row, each chunk's (first token, end token, first chunk of its document), independently of
    DocumentChunks: a chunk starts at p mod L = 0."""
    out = []
    for row in positions.tolist():
        starts = [t for t, p in enumerate(row) if p % L == 0]
        ends = starts[1:] + [len(row)]
        doc_first = []
        for i, s in enumerate(starts):
            doc_first.append(i if row[s] == 0 else doc_first[-1])
        out.append(list(zip(starts, ends, doc_first)))
    return out


@pytest.mark.parametrize("kind, cp", [("zigzag", 2), ("contiguous", 2), ("zigzag", 4)])
@pytest.mark.parametrize("lengths", [
    [[64], [64]],  # one document per row: the blocks start at chunk starts
    [[5, 6, 29, 24], [3, 8, 8, 1, 44]],  # shorter than a chunk, exactly one, straddling blocks, several ranks
    [[13, 13, 13, 13, 12], [1] * 64],  # chunks cut at odd places; a row of one-token documents
])
def test_each_block_holds_whole_chunks_of_the_row_and_each_summary_one_owner(kind, cp, lengths):
    positions = packed_positions(lengths)
    B, S = positions.shape
    chunks = row_chunks(positions)
    owners = [[0] * len(row) for row in chunks]
    for rank in range(cp):
        layout = ContextLayout(kind, rank, cp)
        local_len = S // cp
        blocks = DocumentBlocks.of(positions, layout, local_len, L)
        first, start = (t.tolist() for t in blocks.documents)
        n = layout.blocks_per_rank
        for e in range(B * n):
            b, (lo, hi, begin) = e // n, layout.segments(local_len)[e % n]
            end, origin, extended = begin + hi - lo, begin - blocks.halo, blocks.halo + hi - lo
            covered = []
            for i, s in enumerate(start[e]):
                if s == extended:
                    continue  # past the block's chunks
                global_index = blocks.offset[e].item() + i
                row_start, row_end, doc_first = chunks[b][global_index]
                stop = start[e][i + 1] if i + 1 < len(start[e]) else extended
                assert (origin + s, origin + stop) == (row_start, min(row_end, end)), (e, i)
                assert first[e][i] == doc_first
                owners[b][global_index] += bool(blocks.owned[e, i])
                assert bool(blocks.owned[e, i]) == (row_end <= end)
                covered += range(origin + s, origin + stop)
            assert [t for t in covered if t >= begin] == list(range(begin, end)), e
            halo_tokens = [t - origin for t in covered if t < begin]
            assert blocks.halo_covered[e].nonzero().flatten().tolist() == halo_tokens
    assert owners == [[1] * len(row) for row in chunks]
    assert DocumentChunks.of(positions, L).first_chunk.shape[1] == blocks.n_chunks
