"""Byte-tokenized pydoc data, made once per test session by the real data_prep CLI."""
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import REPO


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "pydoc"
    subprocess.run([sys.executable, "-m", "data_prep", "tokenize", "pydoc", "--out", str(out),
                    "--tokenizer", "byte", "--val-fraction", "0.05"], check=True, cwd=REPO, capture_output=True)
    return out
