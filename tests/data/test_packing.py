"""Packing and mixing arithmetic: every epoch is a permutation of whole documents; mixes are exact."""
import numpy as np
import pytest

from ratpt.data.mixing import WeightedSchedule, block_quotas
from ratpt.data import packing
from ratpt.data.packing import PackedStream


def epoch_stream(packed: PackedStream, lengths: np.ndarray, epoch: int) -> list[tuple[int, int, int]]:
    """The epoch's samples put back in stream order (by the position each slot reads)."""
    S = packed.samples_per_epoch
    by_position = sorted(range(S), key=lambda slot: packed._position(epoch, slot))
    return [piece for slot in by_position for piece in packed.locate(epoch * S + slot)]


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("sample_len", [7, 64, 300], ids=lambda n: f"len{n}")
def test_each_epoch_packs_every_document_once_in_one_order(sample_len, shuffle):
    lengths = np.random.default_rng(0).integers(1, 90, size=250).astype(np.uint32)
    packed = PackedStream(lengths, sample_len, seed=3, shuffle=shuffle, window=16, group_docs=32)
    assert packed.samples_per_epoch == lengths.sum() // sample_len
    orders = []
    for epoch in range(2):
        pieces = epoch_stream(packed, lengths, epoch)
        assert sum(b - a for _, a, b in pieces) == packed.samples_per_epoch * sample_len
        # consecutive pieces continue the same document or start the next one at token 0
        docs = [pieces[0][0]]
        for (d0, _, e0), (d1, s1, _) in zip(pieces, pieces[1:]):
            assert (d1 == d0 and s1 == e0) or (s1 == 0 and e0 == lengths[d0])
            if d1 != d0:
                docs.append(d1)
        assert len(set(docs)) == len(docs)  # no document twice in an epoch
        unseen = set(range(len(lengths))) - set(docs)
        assert int(sum(int(lengths[d]) for d in unseen)) < sample_len  # only the epoch's tail is dropped
        orders.append(docs)
    assert (orders[0] != orders[1]) == shuffle


def brute_force_pieces(lengths: np.ndarray, order: list[int], sample_len: int) -> list[list[tuple[int, int, int]]]:
    """The samples of one epoch by hand: the documents of `order` end to end, cut every sample_len tokens."""
    tokens = [(d, t) for d in order for t in range(int(lengths[d]))]
    samples = []
    for first in range(0, len(tokens) - sample_len + 1, sample_len):
        pieces: list[tuple[int, int, int]] = []
        for d, t in tokens[first:first + sample_len]:
            if pieces and pieces[-1][0] == d:
                pieces[-1] = (d, pieces[-1][1], t + 1)
            else:
                pieces.append((d, t, t + 1))
        samples.append(pieces)
    return samples


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_a_length_filter_packs_exactly_the_long_documents_in_the_unfiltered_order(shuffle, monkeypatch):
    monkeypatch.setattr(packing, "READ_GROUPS", 3)  # the lengths read in several pieces
    lengths = np.random.default_rng(4).integers(1, 120, size=300).astype(np.uint32)
    lengths[70:140] = 5  # whole groups without a long document
    minimum, sample_len = 60, 50
    long = {d for d in range(len(lengths)) if lengths[d] >= minimum}
    kw = dict(seed=3, shuffle=shuffle, window=8, group_docs=32)
    packed = PackedStream(lengths, sample_len, min_doc_tokens=minimum, **kw)
    assert packed.kept_docs == len(long)
    assert packed.samples_per_epoch == sum(int(lengths[d]) for d in long) // sample_len
    everything = PackedStream(lengths, 1, **kw)  # the unfiltered order: one token per sample, nothing dropped
    for epoch in range(2):
        unfiltered = list(dict.fromkeys(d for d, _, _ in epoch_stream(everything, lengths, epoch)))
        order = [d for d in unfiltered if d in long]
        S = packed.samples_per_epoch
        by_position = sorted(range(S), key=lambda slot: packed._position(epoch, slot))
        got = [packed.locate(epoch * S + slot) for slot in by_position]
        assert got == brute_force_pieces(lengths, order, sample_len)


def test_sample_is_a_pure_function_of_seed_and_index():
    lengths = np.random.default_rng(1).integers(1, 50, size=100).astype(np.uint32)
    a = PackedStream(lengths, 16, seed=5, window=8, group_docs=16)
    b = PackedStream(lengths, 16, seed=5, window=8, group_docs=16)
    c = PackedStream(lengths, 16, seed=6, window=8, group_docs=16)
    idx = [517, 3, 250, 3, 1000]
    assert [a.locate(i) for i in idx] == [b.locate(i) for i in reversed(idx)][::-1]
    assert [a.locate(i) for i in idx] != [c.locate(i) for i in idx]


def test_too_little_data_for_one_sample_is_an_error():
    with pytest.raises(ValueError, match="cannot fill one sample"):
        PackedStream(np.array([3, 4], dtype=np.uint32), 100, seed=0)
    with pytest.raises(ValueError, match="at least 50 tokens hold 0 tokens.*or a lower min_doc_tokens"):
        PackedStream(np.array([30, 40] * 10, dtype=np.uint32), 100, seed=0, min_doc_tokens=50)


def test_weighted_schedule_is_exact_per_block_and_a_bijection():
    sched = WeightedSchedule([3.0, 1.0, 0.5], seed=0, block=90)
    assert block_quotas([3.0, 1.0, 0.5], 90).tolist() == [60, 20, 10]
    seen = [sched.locate(i) for i in range(900)]
    assert len(set(seen)) == 900
    for k, quota in enumerate([60, 20, 10]):
        assert sorted(n for kk, n in seen if kk == k) == list(range(10 * quota))
    assert [s[0] for s in seen[:90]] != [s[0] for s in seen[90:180]]  # blocks are shuffled differently


def test_a_weight_too_small_to_be_sampled_is_an_error():
    with pytest.raises(ValueError, match="never be read"):
        WeightedSchedule([1.0, 1e-6], seed=0)
