"""`data_prep train-tokenizer`: a byte-level BPE tokenizer (HF `tokenizers`) trained on a corpus.

Byte-level means every string is encodable (no unknown token) and decoding is exact; the
only special token is EOS, `<|endoftext|>`, id 0. A small vocabulary (e.g. 2048 on the
embedded pydoc corpus) gives a demo model far more text per token than raw bytes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from data_prep.sources import Document, read_records, why_no_documents

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"


MIN_VOCAB = 257  # the byte-level alphabet and EOS
MAX_VOCAB = 1 << 24  # far above any vocabulary in use (Llama-3 128K, Gemma 256K); the trainer allocates for the
#                      whole size up front, and 10^11 aborted the process for want of 4.5 TB


def train_bpe(sources: list[str], vocab_size: int, out: str | Path, text_field: str = "text") -> Path:
    """Train on the documents of `sources` (bad records skipped and counted) and save a
    tokenizer.json at `out` (a file path, or a folder that gets `tokenizer.json`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"--vocab-size must be at least {MIN_VOCAB} (the 256 bytes and EOS) and at most {MAX_VOCAB}, "
                         f"got {vocab_size}")
    out = Path(out)
    if out.suffix != ".json":
        if out.is_file():
            raise ValueError(f"--out {out} is a file: give a .json path, or a folder for tokenizer.json")
        out = out / "tokenizer.json"
    if out.exists():
        raise FileExistsError(f"--out {out} exists, and shards may have been tokenized with it: remove it or "
                              f"choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    bad_records: list[dict[str, str]] = []
    documents = [0]

    def texts() -> Iterator[str]:
        for source in sources:
            for record in read_records(source, text_field):
                if isinstance(record, Document):
                    documents[0] += 1
                    yield record.text
                else:
                    bad_records.append(asdict(record))
                    log.warning("bad record %s: %s: %s", record.location, record.kind, record.detail)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    if not documents[0]:
        raise ValueError(f"no documents in {' '.join(sources)}: {why_no_documents(bad_records, text_field)}")
    partial = out.with_name(out.name + ".partial")  # a killed save leaves no half-written tokenizer at `out`
    tokenizer.save(str(partial))
    os.replace(partial, out)
    log.info("trained BPE vocab %d -> %s (%d bad records skipped)", tokenizer.get_vocab_size(), out, len(bad_records))
    return out
