"""The on-disk contract between data_prep (writer) and ratpt.data (reader).

A prepared dataset DIR (local folder or object-store URL) holds:

    DIR/train/index.json, DIR/train/part-NNNNN/shard.*.mds   one MDS dataset, one sample per document
    DIR/train/doc_tokens.npy      uint32 token count of each document (EOS included), in MDS order;
                                  its sha256 is recorded in index.json under "doc_tokens_sha256"
    DIR/val/...                   the same for the validation split
    DIR/tokenizer/meta.json       the tokenizer's identity (name, kind, vocab_size, eos_id, sha256, dtype)
    DIR/tokenizer/<file>          a copy of the tokenizer file, when it has one
    DIR/stats.json                documents, tokens, bytes, seconds, bad records

Each MDS sample has one column, `tokens`: the document's ids followed by EOS, as uint16 when
the vocabulary fits (<= 65536 ids) else uint32. `doc_tokens.npy` lets the loader map a token
offset to a document without opening every shard at start-up; as it decides which tokens make
up every sample, the loader checks it before training (its hash, its count against the shards'
samples, its total against stats.json's tokens of the split).
"""
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

TRAIN = "train"
VAL = "val"
SPLITS = (TRAIN, VAL)
TOKENIZER_DIR = "tokenizer"
META_FILE = "meta.json"
STATS_FILE = "stats.json"
DOC_TOKENS_FILE = "doc_tokens.npy"
DOC_TOKENS_SHA256 = "doc_tokens_sha256"  # key of a split's index.json: the sha256 of its doc_tokens.npy
INDEX_FILE = "index.json"
TOKENS_COLUMN = "tokens"


def read_record(path: Path, required: Iterable[str]) -> dict[str, Any]:
    """A JSON object of the layout (meta.json, stats.json) holding the `required` keys. A truncated copy
    or an edit is a ValueError naming the file, not a JSONDecodeError that names none or a KeyError."""
    try:
        record = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): it is truncated or damaged; re-copy it from where "
                         "it came from, or re-run data_prep tokenize") from None
    missing = [key for key in required if not isinstance(record, dict) or key not in record]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a data_prep record or was edited; re-copy "
                         "it from where it came from, or re-run data_prep tokenize")
    return record


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: halves the shards for vocabularies <= 65536."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
