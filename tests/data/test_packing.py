"""Packing and mixing arithmetic: every epoch is a permutation of whole documents; mixes are exact."""
import numpy as np
import pytest

from ratpt.data.mixing import WeightedSchedule, block_quotas
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
