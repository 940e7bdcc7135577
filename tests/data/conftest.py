"""Fixtures for the data tests: a tiny prepared dataset shared by the session."""
from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import make_documents, prepare, write_jsonl


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """300 documents in three .jsonl files, and their prepared (byte tokenizer) dataset."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_documents(300, seed=0)
    for i in range(3):
        write_jsonl(root / f"part{i}.jsonl", docs[i * 100 : (i + 1) * 100])
    out = prepare([str(root / "part*.jsonl")], root / "prepared", "--val-fraction", "0.2")
    return docs, out
