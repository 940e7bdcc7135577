"""ratpt.data end to end: text -> shards -> batches, masking, mixing, resumption, ranks, errors."""
import dataclasses
import json
import os
import multiprocessing
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import data_config, make_documents, prepare, write_jsonl

from data_prep.part_writer import is_val
from ratpt.data import build_train_batches, build_val_batches
from ratpt.data.config import StreamConfig
from ratpt.errors import CorruptShardError
from ratpt.data.tokenizer import ByteTokenizer

EOS = 256
BYTE = ByteTokenizer()


def take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


def sample_rows(batches: list[dict]) -> list[tuple[int, ...]]:
    """Each sample's seq_len + 1 tokens, rebuilt from input_ids and the unmasked last label."""
    rows = []
    for b in batches:
        for x, y in zip(b["input_ids"], b["labels"]):
            rows.append(tuple(x.tolist()) + (int(y[-1]),))
    return rows


def train(cfg, *, micro_batch=2, global_batch=8, dp_rank=0, dp_size=1, vocab_size=257, **kw):
    return build_train_batches(cfg, vocab_size=vocab_size, micro_batch=micro_batch, global_batch=global_batch,
                               dp_rank=dp_rank, dp_size=dp_size, **kw)


def test_text_to_shards_to_batches_decodes_back_to_the_documents(corpus):
    docs, out = corpus
    cfg = data_config(out, seq_len=64, shuffle=False, mask_document_boundary=False)
    batches = train(cfg, micro_batch=4, global_batch=4)
    n_samples = batches.dataset.streams[0].packed.samples_per_epoch
    rows = sample_rows(take(batches, n_samples // 4))
    text = BYTE.decode([t for row in rows for t in row])
    pieces = text.split("<|endoftext|>")
    expected = [d for d in docs if not is_val(d, 0.2)]
    assert pieces[:-1] == expected[: len(pieces) - 1]
    assert expected[len(pieces) - 1].startswith(pieces[-1])  # the epoch's tail is cut mid-document
    assert len(pieces) >= len(expected) - 1


def test_shuffled_samples_hold_whole_input_documents(corpus):
    docs, out = corpus
    batches = train(data_config(out, seq_len=256, mask_document_boundary=False), micro_batch=4, global_batch=4)
    inner = [p for row in sample_rows(take(batches, 25)) for p in BYTE.decode(list(row)).split("<|endoftext|>")[1:-1]]
    train_docs = {d for d in docs if not is_val(d, 0.2)}
    assert inner and all(p in train_docs for p in inner)
    assert inner != sorted(inner, key=[d for d in docs if d in train_docs].index)  # not in file order


@pytest.mark.parametrize("mask", [True, False], ids=["masked", "kept"])
def test_labels_are_next_tokens_masked_after_eos_by_config(corpus, mask):
    batch = next(iter(train(data_config(corpus[1], mask_document_boundary=mask))))
    x, y = batch["input_ids"], batch["labels"]
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (2, 64)
    assert torch.equal(x[:, 1:], torch.where(y[:, :-1] == -100, x[:, 1:], y[:, :-1]))
    assert (x == EOS).any()
    assert torch.equal(y == -100, (x == EOS) & mask)


def brute_force_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position in its document, counted by hand: a document starts at the sequence's first
    token and after every EOS (the byte tokenizer's documents hold no other EOS)."""
    positions = torch.zeros_like(input_ids)
    for row, ids in zip(positions, input_ids.tolist()):
        for t in range(1, len(ids)):
            row[t] = 0 if ids[t - 1] == EOS else row[t - 1] + 1
    return positions


def test_document_masking_gives_each_tokens_position_in_its_document(corpus):
    cfg = data_config(corpus[1], seq_len=256, document_masking=True)
    for batch in take(train(cfg, micro_batch=4, global_batch=4), 3):
        assert torch.equal(batch["positions"], brute_force_positions(batch["input_ids"]))
        assert (batch["positions"][:, 1:] == 0).any()  # several documents per sequence
    assert "positions" not in next(iter(train(data_config(corpus[1]))))


def test_document_positions_resume_and_split_over_ranks_with_the_samples(corpus):
    cfg = data_config(corpus[1], document_masking=True)
    reference = [b["positions"] for b in take(train(cfg, micro_batch=1), 8 * 3)]
    first = train(cfg, micro_batch=1)
    take(first, 8)
    ranks = []
    for r in range(2):
        resumed = train(cfg, micro_batch=1, dp_rank=r, dp_size=2)
        resumed.load_state_dict(first.state_dict())
        ranks.append([b["positions"] for b in take(resumed, 4 * 2)])
    got = [p for step in range(2) for r in range(2) for p in ranks[r][step * 4:(step + 1) * 4]]
    assert all(torch.equal(a, b) for a, b in zip(got, reference[8:], strict=True))


@pytest.mark.parametrize("workers", [0, 2], ids=["in_process", "2_workers"])
def test_resume_from_state_continues_the_uninterrupted_order(corpus, workers):
    cfg = data_config(corpus[1], num_workers=workers)
    reference = sample_rows(take(train(cfg), 4 * 9))  # 9 steps of 4 micro-batches
    first = train(cfg)
    head = sample_rows(take(first, 4 * 5))
    state = json.loads(json.dumps(first.state_dict()))
    assert state["samples"] == 5 * 8
    resumed = train(cfg)
    resumed.load_state_dict(state)
    assert head + sample_rows(take(resumed, 4 * 4)) == reference


def _run_until_killed(path: str, states: str) -> None:
    """A training-like loop that checkpoints the data state after each step and is SIGKILLed mid-step."""
    batches = train(data_config(Path(path)), micro_batch=2, global_batch=4)
    with open(states, "a") as log:
        for i, _ in enumerate(batches):
            if i % 2 == 1:  # a step is two micro-batches
                log.write(json.dumps(batches.state_dict()) + "\n")
                log.flush()
            if i == 14:
                os.kill(os.getpid(), signal.SIGKILL)


def test_killed_process_resumes_with_exactly_the_remaining_samples(corpus, tmp_path):
    cfg = data_config(corpus[1])
    states = tmp_path / "states.jsonl"
    proc = multiprocessing.get_context("fork").Process(target=_run_until_killed, args=(str(corpus[1]), str(states)))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL
    last = json.loads(states.read_text().splitlines()[-1])
    assert last["samples"] == 7 * 4
    resumed = train(cfg, micro_batch=2, global_batch=4)
    resumed.load_state_dict(last)
    reference = sample_rows(take(train(cfg, micro_batch=2, global_batch=4), 2 * 10))
    assert sample_rows(take(resumed, 2 * 3)) == reference[7 * 4 :]


@pytest.mark.parametrize("dp_size", [2, 4], ids=lambda n: f"dp{n}")
def test_ranks_split_the_same_global_order_without_duplicates(corpus, dp_size):
    cfg = data_config(corpus[1])
    steps, per_rank = 3, 8 // dp_size
    single = sample_rows(take(train(cfg, micro_batch=1), steps * 8))
    ranks = [sample_rows(take(train(cfg, micro_batch=1, dp_rank=r, dp_size=dp_size), steps * per_rank))
             for r in range(dp_size)]
    for step in range(steps):
        together = [row for r in ranks for row in r[step * per_rank : (step + 1) * per_rank]]
        assert together == single[step * 8 : (step + 1) * 8]
    assert len(set(single)) == len(single)


def resumed_on_ranks(cfg, state: dict, dp_size: int, steps: int) -> list[tuple[int, ...]]:
    """The samples of `steps` steps of 8 after `state`, read by `dp_size` ranks, put back in global order."""
    per_rank = 8 // dp_size
    ranks = []
    for r in range(dp_size):
        resumed = train(cfg, micro_batch=1, dp_rank=r, dp_size=dp_size)
        resumed.load_state_dict(state)
        ranks.append(sample_rows(take(resumed, steps * per_rank)))
    return [row for step in range(steps) for r in range(dp_size)
            for row in ranks[r][step * per_rank:(step + 1) * per_rank]]


def test_resume_on_a_different_number_of_ranks_continues_the_global_order(corpus):
    cfg = data_config(corpus[1])
    reference = sample_rows(take(train(cfg, micro_batch=1), 8 * 5))
    first = train(cfg, micro_batch=1)
    take(first, 8 * 3)
    assert resumed_on_ranks(cfg, first.state_dict(), 4, 2) == reference[8 * 3 :]


def _rank_worker(rank: int, world: int, path: str, cache: str, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_MASTER_PORT"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    cfg = data_config(Path(path))
    cfg.streams[0].local = cache
    rows = sample_rows(take(train(cfg, micro_batch=1, dp_rank=rank, dp_size=world), 2 * 8 // world))
    Path(result_dir, f"{rank}.json").write_text(json.dumps(rows))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_rank_processes_share_a_remote_cache_and_split_the_global_order(tmp_path):
    """Real ranks (gloo), a dataset read as a remote (zstd shards fetched into one shared local
    cache by streaming, under file locks): together they read exactly the single-rank order.
    (2 processes keep it quick; 4 ranks are covered in-process above.)"""
    src = write_jsonl(tmp_path / "a.jsonl", make_documents(200, seed=7))
    out = prepare([str(src)], tmp_path / "remote", "--compression", "zstd", "--shard-size-limit", "8kb")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["TEST_MASTER_PORT"] = str(s.getsockname()[1])
    # fork: the ranks inherit the imports (spawn would spend seconds re-importing torch and streaming)
    torch.multiprocessing.start_processes(
        _rank_worker, args=(2, str(out), str(tmp_path / "cache"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    single = sample_rows(take(train(data_config(out), micro_batch=1), 16))
    got = [tuple(row) for step in range(2) for r in range(2) for row in ranks[r][step * 4 : (step + 1) * 4]]
    assert got == single
    assert list((tmp_path / "cache" / "train").rglob("shard.*.mds"))


def test_streams_are_mixed_by_weight(tmp_path):
    a = prepare([str(write_jsonl(tmp_path / "a.jsonl", make_documents(200, 1, alphabet="a")))], tmp_path / "A")
    b = prepare([str(write_jsonl(tmp_path / "b.jsonl", make_documents(200, 2, alphabet="b")))], tmp_path / "B")
    cfg = data_config(a, b, seq_len=16)
    cfg.streams[0].weight, cfg.streams[1].weight = 3.0, 1.0
    rows = sample_rows(take(train(cfg, micro_batch=64, global_batch=64), 4096 // 64))
    from_a = sum(ord("a") in row for row in rows if ord("b") not in row)
    from_b = sum(ord("b") in row for row in rows if ord("a") not in row)
    assert from_a + from_b >= 4096 - 50  # rows with neither letter are rare ("doc 1-3 é" headers only)
    assert abs(from_a / (from_a + from_b) - 0.75) < 0.01


def test_a_minimum_document_length_reads_only_the_long_documents(corpus):
    docs, out = corpus
    cfg = data_config(out, seq_len=64, shuffle=False, mask_document_boundary=False)
    cfg.streams[0].min_doc_tokens = 300
    batches = train(cfg, micro_batch=4, global_batch=4)
    rows = sample_rows(take(batches, batches.dataset.streams[0].packed.samples_per_epoch // 4))
    pieces = BYTE.decode([t for row in rows for t in row]).split("<|endoftext|>")
    long = [d for d in docs if not is_val(d, 0.2) and len(BYTE.encode(d)) + 1 >= 300]  # + 1: the EOS
    assert 0 < len(long) < len(docs) // 2
    assert pieces[:-1] == long[:len(pieces) - 1] and long[len(pieces) - 1].startswith(pieces[-1])


def test_a_long_document_stream_resumes_on_other_ranks_and_a_changed_minimum_is_other_data(corpus):
    cfg = data_config(corpus[1], corpus[1])  # the same folder twice: everything, and its long documents
    cfg.streams[1].min_doc_tokens = 200
    reference = sample_rows(take(train(cfg, micro_batch=1), 8 * 4))
    first = train(cfg, micro_batch=1)
    take(first, 8 * 2)
    state = first.state_dict()
    assert resumed_on_ranks(cfg, state, 2, 2) == reference[8 * 2 :]
    cfg.streams[1].min_doc_tokens = 100
    with pytest.raises(ValueError, match="different data"):
        train(cfg).load_state_dict(state)


def test_vocab_larger_than_the_model_is_a_clear_error(corpus):
    with pytest.raises(ValueError, match=r"vocab 257.*vocab_size is 200.*model.vocab_size >= 257"):
        build_train_batches(data_config(corpus[1]), vocab_size=200, micro_batch=1, global_batch=1, dp_rank=0, dp_size=1)


def test_streams_with_different_tokenizers_are_a_clear_error(corpus, tmp_path):
    from data_prep.train_tokenizer import train_bpe

    src = write_jsonl(tmp_path / "a.jsonl", make_documents(50, seed=4))
    tok = train_bpe([str(src)], 300, tmp_path / "tok")
    other = prepare([str(src)], tmp_path / "bpe", "--tokenizer", str(tok))
    with pytest.raises(ValueError, match="different tokenizers"):
        train(data_config(corpus[1], other), vocab_size=512)


def test_missing_folder_and_missing_train_split_name_the_path(tmp_path, corpus):
    with pytest.raises(ValueError, match=str(tmp_path / "nowhere")):
        train(data_config(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer").mkdir()
    (broken / "tokenizer/meta.json").write_text((corpus[1] / "tokenizer/meta.json").read_text())
    with pytest.raises(FileNotFoundError, match=str(broken / "train")):
        train(data_config(broken))


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_corrupt_shard_is_an_error_naming_the_file(tmp_path, damage):
    out = prepare([str(write_jsonl(tmp_path / "a.jsonl", make_documents(60, seed=8)))], tmp_path / "out")
    shard = next((out / "train").rglob("shard.00000.mds"))
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        shard.write_bytes(data[:-100])
    else:
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=str(shard)):
        next(iter(train(data_config(out))))


def test_a_truncated_document_table_is_an_error_naming_the_file(tmp_path):
    out = prepare([str(write_jsonl(tmp_path / "a.jsonl", make_documents(20, seed=9)))], tmp_path / "out")
    table = out / "train" / "doc_tokens.npy"
    table.write_bytes(table.read_bytes()[:40])
    with pytest.raises(CorruptShardError, match=str(table)):
        next(iter(train(data_config(out))))


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
@pytest.mark.parametrize("change", [5, -5], ids=["larger", "smaller"])
def test_a_changed_document_table_is_an_error_at_open_naming_the_file(tmp_path, change, verify):
    """A table that disagrees with the shards is refused before any batch, not mid-training (a larger
    count) or never (a smaller one): its recorded hash catches any change, and its token total is
    checked against the shards' even when shard verification is off."""
    out = prepare([str(write_jsonl(tmp_path / "a.jsonl", make_documents(20, seed=9)))], tmp_path / "out")
    table = out / "train" / "doc_tokens.npy"
    counts = np.load(table)
    counts[3] = int(counts[3]) + change
    np.save(table, counts)
    with pytest.raises(CorruptShardError, match=f"{table}.*data_prep tokenize"):
        train(data_config(out, verify_shards=verify))


def test_a_reordered_document_table_is_an_error_at_open(tmp_path):
    out = prepare([str(write_jsonl(tmp_path / "a.jsonl", make_documents(20, seed=9)))], tmp_path / "out")
    table = out / "train" / "doc_tokens.npy"
    np.save(table, np.load(table)[::-1].copy())  # same count, same total: only the hash can tell
    with pytest.raises(CorruptShardError, match=f"{table}.*sha256"):
        train(data_config(out))


def test_resume_on_different_data_or_seed_is_a_clear_error(corpus, tmp_path):
    state = train(data_config(corpus[1])).state_dict()
    with pytest.raises(ValueError, match="different data"):
        train(data_config(corpus[1], seq_len=32)).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        train(dataclasses.replace(data_config(corpus[1]), seed=99)).load_state_dict(state)


def test_validation_is_fixed_disjoint_across_ranks_and_capped(corpus):
    docs, out = corpus
    cfg = data_config(out, seq_len=32)

    def val(rank, size, max_samples=None):
        return sample_rows(list(build_val_batches(cfg, vocab_size=257, micro_batch=2, dp_rank=rank, dp_size=size,
                                                  max_samples=max_samples)))

    single = val(0, 1)
    assert single == val(0, 1)
    halves = [val(r, 2) for r in range(2)]
    assert len(halves[0]) == len(halves[1]) and not set(halves[0]) & set(halves[1])
    assert set(halves[0]) | set(halves[1]) <= set(single)
    assert val(0, 1, max_samples=10) == single[:10]
    text = BYTE.decode([t for row in single for t in row])
    assert text.startswith([d for d in docs if is_val(d, 0.2)][0])


def test_a_stream_config_reads_train_and_val_of_the_same_folder(corpus):
    assert StreamConfig(path=str(corpus[1])).weight == 1.0
    assert next(iter(build_val_batches(data_config(corpus[1]), vocab_size=300, micro_batch=1, dp_rank=0,
                                       dp_size=1, max_samples=1)))["input_ids"].shape == (1, 64)


@pytest.mark.parametrize("record, content, error, message", [
    ("stats.json", "{broken", ValueError, " is not valid JSON"),
    ("stats.json", '{"tokens": {}}', CorruptShardError, " records no token count of train/"),
    ("tokenizer/meta.json", "{}", ValueError, " lacks name, kind, vocab_size, eos_id"),
], ids=["stats-not-json", "stats-without-the-split", "meta-without-keys"])
def test_a_damaged_record_of_the_dataset_is_an_error_naming_it(tmp_path, record, content, error, message):
    """A truncated copy of stats.json was a JSONDecodeError naming no file; a record without its keys a
    KeyError traceback."""
    out = prepare([str(write_jsonl(tmp_path / "a.jsonl", make_documents(20, seed=9)))], tmp_path / "out")
    (out / record).write_text(content)
    with pytest.raises(error, match=f"{out / record}{message}"):
        train(data_config(out))


def test_an_unreadable_shard_is_an_error_naming_it_when_shards_are_not_verified(tmp_path):
    """With data.verify_shards off, a truncated shard was streaming's "not enough values to unpack"."""
    out = prepare([str(write_jsonl(tmp_path / "a.jsonl", make_documents(60, seed=8)))], tmp_path / "out")
    shard = next((out / "train").rglob("shard.00000.mds"))
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(CorruptShardError, match=f"{shard}: document .* cannot be read"):
        next(iter(train(data_config(out, verify_shards=False))))
