"""Where documents come from: input specs -> files -> (location, text) records, bad ones flagged.

A record is either a document or a `BadRecord` naming the file, the line (or row) and why it
was rejected; the caller counts and reports them, or stops at the first with --strict.
Supported: `.jsonl`/`.json` (one JSON object per line, optionally `.gz`/`.zst`), `.parquet`,
`.txt` (one document per file), folders (searched recursively for those), globs, and the
embedded corpus `pydoc` (the topics of CPython's own `pydoc_data.topics`, ~1.6 MB of text).
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Union

PYDOC = "pydoc"  # the embedded corpus that needs no file and no network
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
SUFFIXES = JSONL_SUFFIXES + (".parquet", ".txt")


@dataclass(frozen=True)
class Document:
    location: str  # "file:line" (or "file:row N"); reported with bad records and kept for debugging
    text: str


@dataclass(frozen=True)
class BadRecord:
    location: str  # "file:line", or the file alone when the whole file is unreadable
    kind: str  # unreadable_file | invalid_json | missing_field | not_utf8 | empty_document
    detail: str


Record = Union[Document, BadRecord]


def expand_inputs(specs: list[str]) -> list[str]:
    """Turn files, folders, globs and `pydoc` into a sorted, de-duplicated list of sources.

    Order is deterministic (the order of `specs`, each expanded in sorted order), so a run's
    output does not depend on the file system's listing order. A spec that matches nothing is
    an error: a typo must not silently produce an empty dataset."""
    sources: list[str] = []
    for spec in specs:
        if spec == PYDOC:
            found = [PYDOC]
        elif os.path.isdir(spec):
            found = sorted(
                str(p) for p in Path(spec).rglob("*") if p.is_file() and str(p).endswith(SUFFIXES)
            )
        elif os.path.exists(spec):
            found = [spec]
        else:
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"input {spec!r} matches no file (supported: {', '.join(SUFFIXES)}, or {PYDOC!r})")
        sources.extend(s for s in found if s not in sources)
    return sources


def read_records(source: str, text_field: str = "text") -> Iterator[Record]:
    """Yield the documents of one source in order, and a `BadRecord` for each bad one."""
    if source == PYDOC:
        yield from _pydoc_records()
        return
    try:
        if source.endswith(JSONL_SUFFIXES):
            yield from _jsonl_records(source, text_field)
        elif source.endswith(".parquet"):
            yield from _parquet_records(source, text_field)
        else:
            yield from _txt_records(source)
    except (OSError, EOFError, ValueError) as e:
        # Raised by open() or by a decompressor mid-file (truncated .gz/.zst, not a parquet file).
        yield BadRecord(source, "unreadable_file", f"{type(e).__name__}: {e}")


def _pydoc_records() -> Iterator[Record]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield _checked(f"{PYDOC}:{name}", topics[name])


def _checked(location: str, text: object) -> Record:
    if not isinstance(text, str):
        return BadRecord(location, "missing_field", f"text is {type(text).__name__}, not a string")
    if not text.strip():
        return BadRecord(location, "empty_document", "no text")
    return Document(location, text)


def _open_binary(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _jsonl_records(path: str, text_field: str) -> Iterator[Record]:
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            location = f"{path}:{line_no}"
            if not raw.strip():
                continue  # blank lines between records are not documents
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRecord(location, "not_utf8", str(e))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRecord(location, "invalid_json", str(e))
                continue
            if not isinstance(obj, dict) or text_field not in obj:
                yield BadRecord(location, "missing_field", f"no field {text_field!r}")
                continue
            yield _checked(location, obj[text_field])


def _parquet_records(path: str, text_field: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) or OSError subclasses
        yield BadRecord(path, "unreadable_file", f"{type(e).__name__}: {e}")
        return
    if text_field not in parquet.schema_arrow.names:
        yield BadRecord(path, "missing_field", f"no column {text_field!r} (columns: {parquet.schema_arrow.names})")
        return
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            yield _checked(f"{path}:row {row}", text)


def _txt_records(path: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        yield BadRecord(f"{path}:{line}", "not_utf8", str(e))
        return
    yield _checked(f"{path}:1", text)
