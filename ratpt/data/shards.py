"""One split of one prepared dataset, as documents by index, read through mosaicml-streaming.

`streaming.Stream` gives the index, the shard readers (`MDSReader`) and the download /
decompression of shards into a local cache; this module adds what the loader needs on top:
random access to document i, the per-document token counts, and checks that turn a missing
folder, a missing split, a corrupt shard or a document table that disagrees with the shards into
an error that names the file, before training starts where the check is cheap.

A dataset is "remote" when its path is a URL (s3://, gs://, ...) or when a `local` cache
folder is given: shards are then fetched on first use into the cache (a file lock keeps the
ranks of a node from fetching the same shard twice). A shard is checked once per process,
when first read: its size, and its xxh64 hash when the index records one.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from ratpt.data.layout import (
    DOC_TOKENS_FILE,
    DOC_TOKENS_SHA256,
    INDEX_FILE,
    META_FILE,
    STATS_FILE,
    TOKENIZER_DIR,
    TOKENS_COLUMN,
    read_record,
)
from ratpt.data.streaming_import import streaming
from ratpt.data.tokenizer import file_sha256
from ratpt.errors import CorruptShardError

DOWNLOAD_TIMEOUT_S = 300.0  # per file fetched from a remote dataset


def is_remote(path: str) -> bool:
    return urllib.parse.urlparse(path).scheme not in ("", "file")


def fetch(path: str, local: str | None, relative: str) -> Path:
    """Local file for `path/relative`: the file itself for a local dataset, else a cached copy."""
    if local is None:
        if is_remote(path):
            raise ValueError(f"stream {path}: a remote dataset needs a local cache folder (StreamConfig.local)")
        target = Path(path) / relative
        if not target.is_file():
            raise FileNotFoundError(f"{target} does not exist (is {path} a data_prep output folder?)")
        return target
    target = Path(local) / relative
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{target}.lock"):
            try:
                streaming.base.storage.CloudDownloader.direct_download(
                    f"{path.rstrip('/')}/{relative}", str(target), DOWNLOAD_TIMEOUT_S
                )
            except Exception as e:
                raise FileNotFoundError(f"cannot fetch {path}/{relative} into {target}: {e}") from e
    return target


def read_meta(path: str, local: str | None) -> dict[str, Any]:
    """The tokenizer identity recorded beside the shards (DIR/tokenizer/meta.json)."""
    return read_record(fetch(path, local, f"{TOKENIZER_DIR}/{META_FILE}"), ("name", "kind", "vocab_size", "eos_id"))


class ShardedDocuments:
    """Documents of `path/split` by global index (the order of index.json), token arrays out."""

    def __init__(self, path: str, split: str, local: str | None = None, verify: bool = True) -> None:
        self.path, self.split, self.local, self.verify = path, split, local, verify
        self.index_file = fetch(path, local, f"{split}/{INDEX_FILE}")
        doc_tokens = fetch(path, local, f"{split}/{DOC_TOKENS_FILE}")
        try:
            self.doc_tokens = np.load(doc_tokens, mmap_mode="r")
        except (ValueError, OSError) as err:  # numpy's "EOF: reading array header" names no file
            raise CorruptShardError(f"{doc_tokens} cannot be read ({err}): it is truncated or corrupt; re-run "
                                    "data_prep tokenize into a new folder") from None
        remote = path if local is not None else None
        self.stream = streaming.Stream(remote=remote, local=local or path, split=split)
        self.stream.apply_default(
            {"split": split, "download_retry": 2, "download_timeout": DOWNLOAD_TIMEOUT_S,
             "validate_hash": None, "keep_zip": False}
        )
        try:
            self.shards = self.stream.get_shards(streaming.base.world.World.detect(), allow_unsafe_types=False)
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.index_file}: not a valid MDS index: {e}") from e
        counts = np.asarray([shard.samples for shard in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)])
        if self.shard_starts[-1] != len(self.doc_tokens):
            raise ValueError(
                f"{self.index_file} lists {self.shard_starts[-1]} documents but "
                f"{DOC_TOKENS_FILE} has {len(self.doc_tokens)}: the folder mixes two data_prep runs"
            )
        self._check_doc_tokens(doc_tokens)
        self._checked: set[int] = set()
        if verify and local is None:
            for shard_id in range(len(self.shards)):
                self._check_size(shard_id)

    def __len__(self) -> int:
        return len(self.doc_tokens)

    def fingerprint(self) -> str:
        """Identifies the data (not where it lives): the hash of the split's index.json."""
        return hashlib.sha256(self.index_file.read_bytes()).hexdigest()[:16]

    def tokens(self, doc: int) -> np.ndarray:
        """Token ids of document `doc`, EOS included, in the dtype they were written."""
        shard_id = int(np.searchsorted(self.shard_starts, doc, side="right")) - 1
        shard = self.shards[shard_id]
        if shard_id not in self._checked:
            self._prepare(shard_id)
        try:
            return shard.get_item(doc - int(self.shard_starts[shard_id]))[TOKENS_COLUMN]
        except Exception as e:  # what damaged bytes make streaming's decoder raise: ValueError, IndexError, ...
            raise CorruptShardError(f"{self._raw_file(shard_id)}: document {doc} cannot be read ({type(e).__name__}: "
                                    f"{e}): the shard is corrupt; re-copy the dataset or re-run data_prep (with "
                                    "data.verify_shards on, each shard is checked when first read)") from e

    def _raw_file(self, shard_id: int) -> Path:
        return Path(self.stream.local) / self.split / self.shards[shard_id].raw_data.basename

    def _prepare(self, shard_id: int) -> None:
        """Fetch/decompress the shard if needed (streaming), then check it once."""
        raw = self._raw_file(shard_id)
        if not raw.is_file():
            with FileLock(f"{raw}.lock"):
                try:
                    self.stream.prepare_shard(self.shards[shard_id])
                except Exception as e:
                    raise CorruptShardError(f"{raw}: cannot fetch or decompress this shard: {e}") from e
        if self.verify:
            self._check_size(shard_id)
            self._check_hash(shard_id)
        self._checked.add(shard_id)

    def _check_size(self, shard_id: int) -> None:
        shard = self.shards[shard_id]
        raw = self._raw_file(shard_id)
        if not raw.is_file():
            zipped = shard.zip_data and (raw.parent / Path(shard.zip_data.basename).name).is_file()
            if not zipped:
                raise FileNotFoundError(f"{raw}: shard listed in {self.index_file} is missing")
            return
        size = os.path.getsize(raw)
        if size != shard.raw_data.bytes:
            raise CorruptShardError(
                f"{raw}: {size} bytes but {self.index_file} says {shard.raw_data.bytes} (truncated or replaced); "
                "re-run data_prep or re-copy the dataset"
            )

    def _check_hash(self, shard_id: int) -> None:
        expected = self.shards[shard_id].raw_data.hashes.get("xxh64")
        if expected is None:
            return
        raw = self._raw_file(shard_id)
        actual = streaming.base.hashing.get_hash("xxh64", raw.read_bytes())
        if actual != expected:
            raise CorruptShardError(f"{raw}: xxh64 {actual} differs from {self.index_file} ({expected}); the shard is corrupt")

    def _check_doc_tokens(self, table: Path) -> None:
        """The document table decides which tokens make up every sample, so a wrong one is caught
        here, not as a mis-sized batch mid-training (a count too large) or never (too small):
        its sha256 against index.json (when verifying; datasets prepared before the hash was
        recorded have none), and always its total against the tokens stats.json says the shards hold."""
        fix = "re-copy the dataset, or re-run data_prep tokenize into a new folder"
        expected = json.loads(self.index_file.read_text()).get(DOC_TOKENS_SHA256)
        if self.verify and expected is not None and file_sha256(table) != expected:
            raise CorruptShardError(f"{table}: sha256 differs from the one {self.index_file} records: the document "
                                    f"table was changed or replaced; {fix}")
        stats_file = fetch(self.path, self.local, STATS_FILE)
        tokens_by_split = read_record(stats_file, ("tokens",))["tokens"]
        if not isinstance(tokens_by_split, dict) or self.split not in tokens_by_split:
            raise CorruptShardError(f"{stats_file} records no token count of {self.split}/; {fix}")
        written = tokens_by_split[self.split]
        total = int(self.doc_tokens.sum(dtype=np.int64))
        if total != written:
            raise CorruptShardError(f"{table}: its document lengths add up to {total} tokens, but data_prep wrote "
                                    f"{written} into the shards of {self.split}/ ({stats_file}); {fix}")

    def __getstate__(self) -> dict[str, Any]:
        # A memory map is reopened by name in a DataLoader worker instead of being copied.
        state = self.__dict__.copy()
        state["doc_tokens"] = str(self.doc_tokens.filename)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["doc_tokens"] = np.load(state["doc_tokens"], mmap_mode="r")
        self.__dict__.update(state)
