"""Where documents come from: input specs -> files -> (location, text) records, bad ones flagged.

A record is either a document or a `BadRecord` naming the file, the line (or row) and why it
was rejected; the caller counts and reports them, or stops at the first with --strict.
Supported: `.jsonl`/`.json` (one JSON object per line, optionally `.gz`/`.zst`), `.parquet`,
`.txt` (one document per file), folders and globs (searched for those), and the embedded
corpus `pydoc` (the topics of CPython's own `pydoc_data.topics`, ~1.6 MB of text). Suffixes
match in any case; a file named outright must have one of them, so that no other format is
read as one plain-text document.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Union

log = logging.getLogger(__name__)

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
    kind: str  # unreadable_file | invalid_json | missing_field | not_a_string | not_utf8 | empty_document
    detail: str


Record = Union[Document, BadRecord]


def is_supported(path: str) -> bool:
    return path.lower().endswith(SUFFIXES)


def expand_inputs(specs: list[str]) -> list[str]:
    """Turn files, folders, globs and `pydoc` into a sorted, de-duplicated list of sources.

    Order is deterministic (the order of `specs`, each expanded in sorted order), so a run's
    output does not depend on the file system's listing order. A spec that matches nothing is
    an error: a typo must not silently produce an empty dataset. A file is listed once however
    it is spelled (`a.jsonl`, `./a.jsonl`, a folder and a glob over it): its documents would
    otherwise be trained on twice."""
    sources: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        if spec == PYDOC:
            found = [PYDOC]
        elif os.path.isdir(spec):
            found = _supported_files(spec, [str(p) for p in Path(spec).rglob("*") if p.is_file()])
        elif os.path.exists(spec):
            if not is_supported(spec):
                raise ValueError(f"input {spec!r} is not a supported file type ({', '.join(SUFFIXES)}): convert "
                                 "it, or rename a plain-text file to .txt")
            found = [spec]
        else:
            found = _supported_files(spec, [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)])
        if not found:
            raise FileNotFoundError(f"input {spec!r} matches no file (supported: {', '.join(SUFFIXES)}, or {PYDOC!r})")
        for source in found:
            identity = source if source == PYDOC else os.path.realpath(source)
            if identity not in seen:
                seen.add(identity)
                sources.append(source)
    return sources


def _supported_files(spec: str, files: list[str]) -> list[str]:
    """The files of a folder or glob that have a supported suffix, sorted; the others are named in a
    warning (a `.jsonl.bz2` or `.csv` beside the inputs would otherwise be left out without a word)."""
    skipped = sorted(f for f in files if not is_supported(f))
    if skipped:
        log.warning("input %r: %d file(s) of unsupported types left out, e.g. %s", spec, len(skipped),
                    ", ".join(skipped[:3]))
    return sorted(f for f in files if is_supported(f))


def why_no_documents(bad_records: list[dict[str, str]], text_field: str) -> str:
    """The likely cause, from what the records were rejected for: each kind of bad record with its
    count, its first location and what to do; --text-field is suspected only when records lacked
    that field, and inputs without a single record are called empty."""
    by_kind: dict[str, list[dict[str, str]]] = {}
    for record in bad_records:
        by_kind.setdefault(record["kind"], []).append(record)
    if not by_kind:
        return "the inputs hold no records: they are empty"
    if "unreadable_file" in by_kind:
        files = by_kind.pop("unreadable_file")
        reasons = [f"{len(files)} input file(s) cannot be read, first {files[0]['location']} cannot be read "
                   f"({files[0]['detail']}): replace or remove them"]
    else:
        reasons = []
    fixes = {
        "missing_field": f"is --text-field {text_field!r} the field that holds the text?",
        "not_a_string": f"--text-field {text_field!r} must name a field that holds the text as a string",
        "invalid_json": ".jsonl/.json inputs hold one JSON object per line (JSON Lines)",
        "not_utf8": "inputs are read as UTF-8: convert them, e.g. iconv -t UTF-8",
        "empty_document": "every document was empty",
    }
    for kind, records in by_kind.items():
        reasons.append(f"{len(records)} record(s) {kind}, first {records[0]['location']} ({records[0]['detail']}): "
                       f"{fixes.get(kind, 'see stats.json')}")
    return "; ".join(reasons)


def read_records(source: str, text_field: str = "text") -> Iterator[Record]:
    """Yield the documents of one source in order, and a `BadRecord` for each bad one."""
    if source == PYDOC:
        yield from _pydoc_records()
        return
    try:
        if source.lower().endswith(JSONL_SUFFIXES):
            yield from _jsonl_records(source, text_field)
        elif source.lower().endswith(".parquet"):
            yield from _parquet_records(source, text_field)
        else:
            yield from _txt_records(source)
    except (OSError, EOFError, ValueError) as e:
        # Raised by open() or by a decompressor mid-file (a truncated or corrupt .gz/.zst, not a parquet file).
        yield BadRecord(source, "unreadable_file", f"{type(e).__name__}: {e}")


def _pydoc_records() -> Iterator[Record]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield _checked(f"{PYDOC}:{name}", "text", topics[name])


def _checked(location: str, text_field: str, text: object) -> Record:
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        return BadRecord(location, "not_a_string", f"{text_field!r} is {kind}, not a string")
    if not text.strip():
        return BadRecord(location, "empty_document", "no text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a JSON escape such as "\ud800": a string, but no text that UTF-8 can hold
        return BadRecord(location, "not_utf8", f"a lone surrogate {text[e.start]!r} at character {e.start}")
    return Document(location, text)


def _open_binary(path: str) -> IO[bytes]:
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    if path.lower().endswith(".zst"):
        return io.BufferedReader(_ZstdFile(path))
    return open(path, "rb")


class _ZstdFile(io.RawIOBase):
    """A .zst file decompressed frame after frame, as a raw binary stream. A file that ends inside a
    frame raises EOFError and corrupt data a ValueError, as gzip does: zstandard's own stream_reader
    returns what it decoded and stops, so a truncated file lost its last documents without a word."""

    def __init__(self, path: str) -> None:
        self._chunks = _zstd_chunks(path)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._chunks.close()
        super().close()


def _zstd_chunks(path: str, read_size: int = 1 << 20) -> Iterator[bytes]:
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame = None  # the frame being decoded; None between frames
    with open(path, "rb") as f:
        while data := f.read(read_size):
            while data:
                frame = frame or decompressor.decompressobj()
                try:
                    yield frame.decompress(data)
                except zstandard.ZstdError as e:
                    raise ValueError(f"corrupt zstd data: {e}") from None
                data = frame.unused_data if frame.eof else b""
                frame = None if frame.eof else frame
    if frame is not None:
        raise EOFError("the file ends inside a zstd frame: it is truncated")


def _jsonl_records(path: str, text_field: str) -> Iterator[Record]:
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            location = f"{path}:{line_no}"
            if not raw.strip():
                continue  # blank lines between records are not documents
            try:
                line = raw.decode("utf-8-sig")  # a byte order mark (a file saved on Windows, or several concatenated)
            except UnicodeDecodeError as e:
                yield BadRecord(location, "not_utf8", str(e))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRecord(location, "invalid_json", str(e))
                continue
            if not isinstance(obj, dict):
                yield BadRecord(location, "invalid_json", f"a JSON {type(obj).__name__}, not an object")
                continue
            if text_field not in obj:
                yield BadRecord(location, "missing_field", f"no field {text_field!r}")
                continue
            yield _checked(location, text_field, obj[text_field])


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
            yield _checked(f"{path}:row {row}", text_field, text)


def _txt_records(path: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        yield BadRecord(f"{path}:{line}", "not_utf8", str(e))
        return
    yield _checked(f"{path}:1", "text", text)
