"""Tokenize one source into its own MDS part: `DIR/train/part-NNNNN` and `DIR/val/part-NNNNN`.

One part per input file keeps the output independent of the number of workers (part N is
always source N) and makes resumption simple: a part is either complete (its marker in
`DIR/.parts/` exists) or redone from scratch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from data_prep.sources import BadRecord, Document, read_records
from ratpt.data.layout import DOC_TOKENS_FILE, INDEX_FILE, SPLITS, TOKENS_COLUMN, TRAIN, VAL, token_dtype
from ratpt.data.streaming_import import streaming
from ratpt.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PARTS_DIR = ".parts"  # completion markers, one JSON per finished part
ENCODE_BATCH_DOCS = 256  # documents handed to the tokenizer at once (HF/SentencePiece batch in C++/Rust)


class BadInputError(Exception):
    """A bad record under --strict: the message names the file and line."""


@dataclass
class WriterSettings:
    text_field: str  # JSON key / parquet column holding the text
    val_fraction: float  # share of documents (by hash) that go to val/
    shard_size_limit: str  # MDSWriter size_limit, e.g. "64mb"
    compression: str | None  # MDSWriter compression, e.g. "zstd", or None
    hashes: tuple[str, ...]  # MDSWriter hash algorithms recorded in index.json
    strict: bool  # stop at the first bad record


@dataclass
class PartResult:
    part: str
    source: str
    documents: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    tokens: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    bytes: int = 0
    seconds: float = 0.0
    bad_records: list[dict[str, str]] = field(default_factory=list)


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic split by a hash of the text: identical documents land in the same split,
    whatever the worker count or input order, so val never leaks into train."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return h < val_fraction * 2**64


def marker_path(out: Path, part: str) -> Path:
    return out / PARTS_DIR / f"{part}.json"


def load_done(out: Path, part: str) -> PartResult | None:
    """The result of a part an earlier attempt finished, or None to (re)do it: no marker, or a marker
    whose part lost its index or document table since (deleted, an incomplete copy), which made the
    merge of a --resume fail in streaming's merge_index."""
    path = marker_path(out, part)
    if not path.is_file():
        return None
    lost = [f"{split}/{part}/{name}" for split in SPLITS for name in (INDEX_FILE, DOC_TOKENS_FILE)
            if not (out / split / part / name).is_file()]
    if lost:
        log.warning("%s: %s is missing, so this part is tokenized again", out, lost[0])
        return None
    return PartResult(**json.loads(path.read_text()))


def write_part(
    out: Path,
    index: int,
    source: str,
    tokenizer: Tokenizer,
    settings: WriterSettings,
    progress: Callable[[int, int], None],
) -> PartResult:
    """Tokenize `source` into part `index` of both splits and mark it done; report (docs, tokens)
    increments through `progress`. A leftover of an interrupted attempt is removed first."""
    start = time.perf_counter()
    result = PartResult(part=part_name(index), source=source)
    dtype = token_dtype(tokenizer.vocab_size)
    counts: dict[str, list[int]] = {s: [] for s in SPLITS}
    writers = {}
    for split in SPLITS:
        folder = out / split / result.part
        shutil.rmtree(folder, ignore_errors=True)
        writers[split] = streaming.MDSWriter(
            out=str(folder),
            columns={TOKENS_COLUMN: f"ndarray:{dtype.name}"},
            compression=settings.compression,
            hashes=list(settings.hashes),
            size_limit=settings.shard_size_limit,
            progress_bar=False,
        )

    def flush(batch: list[Document]) -> None:
        ids_list = tokenizer.encode_batch([d.text for d in batch])
        tokens = 0
        for doc, ids in zip(batch, ids_list):
            if not ids:
                _bad(result, BadRecord(doc.location, "empty_document", "tokenizes to nothing"), settings.strict)
                continue
            split = VAL if is_val(doc.text, settings.val_fraction) else TRAIN
            arr = np.asarray(ids + [tokenizer.eos_id], dtype=dtype)
            writers[split].write({TOKENS_COLUMN: arr})
            counts[split].append(len(arr))
            result.documents[split] += 1
            result.tokens[split] += len(arr)
            result.bytes += len(doc.text.encode("utf-8"))
            tokens += len(arr)
        progress(len(batch), tokens)

    batch: list[Document] = []
    for record in read_records(source, settings.text_field):
        if isinstance(record, BadRecord):
            _bad(result, record, settings.strict)
            continue
        batch.append(record)
        if len(batch) == ENCODE_BATCH_DOCS:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    for split in SPLITS:
        writers[split].finish()
        np.save(out / split / result.part / DOC_TOKENS_FILE, np.asarray(counts[split], dtype=np.uint32))
    result.seconds = time.perf_counter() - start
    _write_marker(out, result)
    return result


def _bad(result: PartResult, record: BadRecord, strict: bool) -> None:
    if strict:
        raise BadInputError(f"{record.location}: {record.kind}: {record.detail}")
    result.bad_records.append(asdict(record))


def _write_marker(out: Path, result: PartResult) -> None:
    path = marker_path(out, result.part)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, path)  # atomic: a marker exists only for a complete part
