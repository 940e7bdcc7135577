"""Global sample index -> packed token tensor, over one or more opened streams; and collation.

`PackedTokenDataset` is a map-style dataset, so any DataLoader worker can produce any sample:
which samples a rank reads is decided by the batch sampler in batches.py, not here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from ratpt.data.config import DataConfig, StreamConfig
from ratpt.data.packing import PackedStream
from ratpt.data.shards import ShardedDocuments, read_meta
from ratpt.data.tokenizer import same_tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that cross-entropy skips


class Schedule(Protocol):
    def locate(self, i: int) -> tuple[int, int]: ...


@dataclass
class OpenStream:
    config: StreamConfig
    docs: ShardedDocuments
    packed: PackedStream


def check_trained_tokenizer(checkpoint: str, streams: list[StreamConfig], vocab_size: int) -> None:
    """The streams hold the tokens of the tokenizer `checkpoint` was trained on (its tokenizer/ copy):
    evaluating or resuming on another tokenizer's ids would run without an error and mean nothing."""
    try:
        trained = read_meta(checkpoint, None)
    except FileNotFoundError:
        return  # a checkpoint written without a tokenizer record: nothing to compare
    data = check_tokenizers(streams, vocab_size)
    if not same_tokenizer(trained, data):
        raise ValueError(
            f"{checkpoint} was trained on {trained['name']!r} tokens (vocab {trained['vocab_size']}), but stream "
            f"{data['stream']} holds {data['name']!r} tokens (vocab {data['vocab_size']}): use data tokenized "
            f"with the checkpoint's tokenizer (data_prep tokenize --tokenizer {checkpoint}/tokenizer ...)"
        )


def check_tokenizers(streams: list[StreamConfig], vocab_size: int) -> dict[str, Any]:
    """The one tokenizer all streams share; a `ValueError` naming the stream and the fix otherwise."""
    first: dict[str, Any] | None = None
    for s in streams:
        try:
            meta = read_meta(s.path, s.local)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"stream {s.path}: cannot read its tokenizer record: {e}") from e
        if meta["vocab_size"] > vocab_size:
            raise ValueError(
                f"stream {s.path} was tokenized with {meta['name']!r} (vocab {meta['vocab_size']}) but the model's "
                f"vocab_size is {vocab_size}: set model.vocab_size >= {meta['vocab_size']}, or re-run data_prep "
                "with the model's tokenizer"
            )
        if first is None:
            first = meta | {"stream": s.path}
        elif not same_tokenizer(meta, first):
            raise ValueError(
                f"streams {first['stream']} ({first['name']!r}) and {s.path} ({meta['name']!r}) were tokenized with "
                "different tokenizers: re-run data_prep on one of them with the other's --tokenizer "
                f"({first['stream']}/tokenizer)"
            )
    assert first is not None, "no streams"
    return first


def open_streams(cfg: DataConfig, split: str, *, shuffle: bool, skip_empty: bool = False) -> list[OpenStream]:
    """Open `split` of every stream and index its packed samples (see packing.py for the cost).

    With `skip_empty`, a stream whose split cannot fill one sample is left out with a warning
    (a small val/ split), instead of being an error."""
    opened = []
    for k, s in enumerate(cfg.streams):
        docs = ShardedDocuments(s.path, split, s.local, verify=cfg.verify_shards)
        try:
            packed = PackedStream(
                docs.doc_tokens, cfg.seq_len + 1, cfg.seed, stream_id=k, shuffle=shuffle, window=cfg.shuffle_window,
                min_doc_tokens=s.min_doc_tokens,
            )
        except ValueError as e:
            if not skip_empty:
                raise ValueError(f"stream {s.path}/{split}: {e}") from e
            log.warning("stream %s/%s skipped: %s", s.path, split, e)
            continue
        if s.min_doc_tokens:
            log.info("stream %s/%s: %d of %d documents hold at least %d tokens (%d tokens, %d samples per epoch)",
                     s.path, split, packed.kept_docs, len(docs), s.min_doc_tokens, packed.total_tokens,
                     packed.samples_per_epoch)
        opened.append(OpenStream(s, docs, packed))
    return opened


class PackedTokenDataset(Dataset):
    """Sample i of the global order: {"tokens": seq_len + 1 token ids (int64), documents packed with EOS,
    "doc_lengths": the tokens each packed document (or piece of one) holds there, in order}."""

    def __init__(self, streams: list[OpenStream], schedule: Schedule) -> None:
        self.streams = streams
        self.schedule = schedule

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k, n = self.schedule.locate(i)
        stream = self.streams[k]
        located = stream.packed.locate(n)
        pieces = [stream.docs.tokens(doc)[start:stop] for doc, start, stop in located]
        return {"tokens": torch.from_numpy(np.concatenate(pieces).astype(np.int64)),
                "doc_lengths": torch.tensor([stop - start for _, start, stop in located], dtype=torch.int64)}


def document_positions(doc_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """Each of the first `length` tokens' position in its document (0 at a document's first token), for
    documents of `doc_lengths` laid end to end. A sample's first piece may continue a document of the sample
    before: it counts as a document of its own, since the tokens before it are not in the sequence."""
    starts = torch.cumsum(doc_lengths, 0) - doc_lengths
    return (torch.arange(int(doc_lengths.sum())) - torch.repeat_interleave(starts, doc_lengths))[:length]


class Collate:
    """Stacks samples into {"input_ids", "labels"}: labels are the next tokens, and with
    `mask_eos` a label whose input token is EOS (the first token of the next document,
    unpredictable from the previous one) is IGNORE_INDEX, as in the paper. With `positions`
    (data.document_masking) also "positions": each input token's position in its document
    (document_positions), which is all the model needs to keep the documents apart."""

    def __init__(self, eos_id: int, mask_eos: bool, positions: bool = False) -> None:
        self.eos_id = eos_id
        self.mask_eos = mask_eos
        self.positions = positions

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        x = torch.stack([s["tokens"] for s in samples])
        input_ids = x[:, :-1]
        labels = x[:, 1:].clone()
        if self.mask_eos:
            labels[input_ids == self.eos_id] = IGNORE_INDEX
        batch = {"input_ids": input_ids.contiguous(), "labels": labels}
        if self.positions:
            T = input_ids.shape[1]
            batch["positions"] = torch.stack([document_positions(s["doc_lengths"], T) for s in samples])
        return batch
