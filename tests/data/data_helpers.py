"""Helpers for the data tests: tiny corpora made here (nothing is downloaded)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from data_prep.__main__ import main as data_prep_main
from ratpt.data.config import DataConfig, StreamConfig


def make_documents(n: int, seed: int, alphabet: str = "abcdefghij klmnopqrstuvwxyz.") -> list[str]:
    """Documents of varied length (5..400 chars), distinct, with some non-ASCII text."""
    rng = random.Random(seed)
    return [
        f"doc {seed}-{i} é " + "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 400))) for i in range(n)
    ]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def prepare(inputs: list[str], out: Path, *extra: str) -> Path:
    """Run `python -m data_prep tokenize` in-process; assert success."""
    assert data_prep_main(["tokenize", *inputs, "--out", str(out), *extra]) == 0
    return out


def data_config(*paths: Path, seq_len: int = 64, **kwargs) -> DataConfig:
    return DataConfig(streams=[StreamConfig(path=str(p)) for p in paths], seq_len=seq_len, **kwargs)
