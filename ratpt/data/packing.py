"""Which tokens make up sample n of one stream: documents packed into samples of seq_len + 1.

Each epoch, a stream's documents (each already ending in EOS) are laid end to end in a
seeded order, giving one virtual token stream that is cut into `samples_per_epoch` samples
(the last partial sample of an epoch is dropped). Sample n lives in epoch n // S at slot
n % S; slots are shuffled inside windows of `window` consecutive samples, so a batch mixes
text from across the window while a remote cache only needs the window's shards at a time.

The document order is two-level so that nothing O(documents) is ever materialised:
documents are cut into groups of `group_docs` consecutive documents (as written on disk);
an epoch permutes the groups, and each group permutes its own documents. Locating a sample
is a binary search over the epoch's group offsets plus one group's cumulative lengths.

Cost, for D documents: start-up reads `doc_tokens` once (O(D) time, sequential, memory-
mapped) and keeps O(D / group_docs) integers per epoch; each sample costs O(log(D /
group_docs)) plus O(group_docs) on a group-cache miss; window permutations are O(window).
At 100M documents that is ~25K groups (~400 KB) and a sub-second start-up from page cache.
Everything is a pure function of (seed, stream id, epoch, index): no state to save but n.

A length filter (`min_doc_tokens`) leaves the documents shorter than the minimum out of every
epoch. It is applied after the shuffle, inside each group, so the documents kept keep the order
they have unfiltered, start-up stays O(D) sequential reads, and nothing else changes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

GROUP_DOCS = 4096  # documents shuffled together inside a group; groups are shuffled per epoch
READ_GROUPS = 256  # groups of document lengths read at a time when filtering (a bounded copy)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class PackedStream:
    """Random access to the packed samples of one split (all epochs, endlessly).

    `doc_tokens` is the per-document token count (EOS included), usually a memory map of
    `doc_tokens.npy`. `locate(n)` returns the (document, start, stop) pieces of sample n.
    Documents of fewer than `min_doc_tokens` tokens are never read (0 keeps every document)."""

    def __init__(
        self,
        doc_tokens: np.ndarray,
        sample_len: int,
        seed: int,
        stream_id: int = 0,
        shuffle: bool = True,
        window: int = 65536,
        group_docs: int = GROUP_DOCS,
        min_doc_tokens: int = 0,
    ) -> None:
        self.doc_tokens = doc_tokens
        self.sample_len = sample_len
        self.key = (seed, stream_id)
        self.shuffle = shuffle
        self.group_docs = group_docs
        self.min_doc_tokens = min_doc_tokens
        self.n_groups = -(-len(doc_tokens) // group_docs)
        self.group_tokens, self.kept_docs = self._kept_per_group()
        self.total_tokens = int(self.group_tokens.sum())
        self.samples_per_epoch = self.total_tokens // sample_len
        if self.samples_per_epoch == 0:
            kept = f"documents of at least {min_doc_tokens} tokens hold " if min_doc_tokens else ""
            raise ValueError(
                f"{kept}{self.total_tokens} tokens, which cannot fill one sample of {sample_len} tokens; "
                f"use more data or a shorter seq_len{', or a lower min_doc_tokens' if min_doc_tokens else ''}"
            )
        if window < 1:
            raise ValueError(f"shuffle window must be >= 1 sample, got {window}")
        self.window = min(window, self.samples_per_epoch)
        self._make_caches()

    def _kept_per_group(self) -> tuple[np.ndarray, int]:
        """Tokens of the documents each group keeps, and how many documents are kept in all; read
        READ_GROUPS groups at a time, so a filter never copies the whole table."""
        sums, kept = [np.zeros(0, np.int64)], 0
        step = self.group_docs * READ_GROUPS
        for first in range(0, len(self.doc_tokens), step):
            lengths = np.array(self.doc_tokens[first:first + step], dtype=np.int64)  # a copy: zeroed below
            short = lengths < self.min_doc_tokens
            lengths[short] = 0
            kept += len(lengths) - int(short.sum())
            sums.append(np.add.reduceat(lengths, np.arange(0, len(lengths), self.group_docs)))
        return np.concatenate(sums), kept

    def _make_caches(self) -> None:
        """Caches of pure functions of their arguments: they never change results."""
        self._epoch_groups = lru_cache(maxsize=2)(self._epoch_groups_uncached)
        self._group_docs = lru_cache(maxsize=256)(self._group_docs_uncached)
        self._window_order = lru_cache(maxsize=4)(self._window_order_uncached)

    def __getstate__(self) -> dict:
        # DataLoader workers may receive a pickled copy: caches are rebuilt there, and a memory
        # map is reopened by file name instead of being copied into the pickle.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_epoch_groups", "_group_docs", "_window_order")}
        if isinstance(self.doc_tokens, np.memmap) and self.doc_tokens.filename:
            state["doc_tokens"] = str(self.doc_tokens.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["doc_tokens"], str):
            state["doc_tokens"] = np.load(state["doc_tokens"], mmap_mode="r")
        self.__dict__.update(state)
        self._make_caches()

    def locate(self, n: int) -> list[tuple[int, int, int]]:
        """Pieces (document index, first token, end token) whose concatenation is sample n."""
        epoch, slot = divmod(n, self.samples_per_epoch)
        position = self._position(epoch, slot)
        start = position * self.sample_len
        need = self.sample_len
        order, offsets = self._epoch_groups(epoch)
        k = int(np.searchsorted(offsets, start, side="right")) - 1
        pieces: list[tuple[int, int, int]] = []
        while need:
            docs, doc_offsets = self._group_docs(epoch, int(order[k]))
            local = start - int(offsets[k])
            j = int(np.searchsorted(doc_offsets, local, side="right")) - 1
            while need and j < len(docs):
                begin = local - int(doc_offsets[j])
                take = min(need, int(doc_offsets[j + 1]) - local)
                pieces.append((int(docs[j]), begin, begin + take))
                need -= take
                local += take
                start += take
                j += 1
            k += 1
        return pieces

    def _position(self, epoch: int, slot: int) -> int:
        """Where in the epoch's virtual stream slot `slot` reads (a permutation per window)."""
        if not self.shuffle:
            return slot
        w, i = divmod(slot, self.window)
        return w * self.window + int(self._window_order(epoch, w)[i])

    def _window_order_uncached(self, epoch: int, w: int) -> np.ndarray:
        size = min(self.window, self.samples_per_epoch - w * self.window)
        return _rng(*self.key, epoch, 1, w).permutation(size)

    def _epoch_groups_uncached(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's group order and the token offset where each group starts in it."""
        order = _rng(*self.key, epoch, 2).permutation(self.n_groups) if self.shuffle else np.arange(self.n_groups)
        offsets = np.zeros(self.n_groups + 1, dtype=np.int64)
        np.cumsum(self.group_tokens[order], out=offsets[1:])
        return order, offsets

    def _group_docs_uncached(self, epoch: int, group: int) -> tuple[np.ndarray, np.ndarray]:
        """The group's documents in this epoch's order and their token offsets inside the group."""
        first = group * self.group_docs
        docs = np.arange(first, min(first + self.group_docs, len(self.doc_tokens)), dtype=np.int64)
        if self.shuffle:
            docs = first + _rng(*self.key, epoch, 3, group).permutation(len(docs))
        lengths = np.asarray(self.doc_tokens[docs], dtype=np.int64)
        keep = lengths >= self.min_doc_tokens
        docs, lengths = docs[keep], lengths[keep]
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return docs, offsets
