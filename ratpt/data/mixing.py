"""Which stream global sample i comes from: a seeded, exactly-weighted interleaving.

Global samples are cut into blocks of `block` samples. Every block holds the same number of
samples of each stream (largest-remainder rounding of weight * block), in a seeded order of
its own, so stream k's n-th sample is found in O(block) without replaying history, and the
mix is exact at every block boundary. A single stream is the identity.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

MIX_BLOCK = 4096  # samples per mixing block: weights are honoured to 1/MIX_BLOCK


def block_quotas(weights: list[float], block: int) -> np.ndarray:
    """Samples per block for each stream: largest-remainder rounding of the normalised weights."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w <= 0).any():
        raise ValueError(f"stream weights must be positive, got {weights}")
    exact = w / w.sum() * block
    quotas = np.floor(exact).astype(np.int64)
    extra = block - int(quotas.sum())
    quotas[np.argsort(-(exact - quotas), kind="stable")[:extra]] += 1
    if (quotas == 0).any():
        raise ValueError(f"stream weights {weights}: a stream below 1/{block} of the mix would never be read")
    return quotas


class WeightedSchedule:
    """Maps global sample i to (stream k, n), the n-th sample of stream k."""

    def __init__(self, weights: list[float], seed: int, block: int = MIX_BLOCK) -> None:
        self.seed = seed
        self.single = len(weights) == 1
        self.block = 1 if self.single else block
        self.quotas = block_quotas(weights, self.block)
        self._assignments = lru_cache(maxsize=8)(self._assignments_uncached)

    def locate(self, i: int) -> tuple[int, int]:
        if self.single:
            return 0, i
        b, j = divmod(i, self.block)
        streams, ranks = self._assignments(b)
        k = int(streams[j])
        return k, b * int(self.quotas[k]) + int(ranks[j])

    def _assignments_uncached(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream of each slot of block b, and the slot's rank among that stream's slots."""
        streams = np.repeat(np.arange(len(self.quotas)), self.quotas)
        streams = streams[np.random.default_rng([self.seed, 7, b]).permutation(self.block)]
        ranks = np.zeros(self.block, dtype=np.int64)
        for k in range(len(self.quotas)):
            mask = streams == k
            ranks[mask] = np.arange(int(mask.sum()))
        return streams, ranks

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_assignments"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._assignments = lru_cache(maxsize=8)(self._assignments_uncached)


class SequentialSchedule:
    """Maps index i to (stream k, n) when streams are read one after another (validation)."""

    def __init__(self, counts: list[int]) -> None:
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])
