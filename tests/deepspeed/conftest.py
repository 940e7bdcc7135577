"""Byte-tokenized pydoc data for the end-to-end DeepSpeed runs, made once by the real data_prep CLI."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ds_byte_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "pydoc"
    subprocess.run([sys.executable, "-m", "data_prep", "tokenize", "pydoc", "--out", str(out),
                    "--tokenizer", "byte", "--val-fraction", "0.05"], check=True, cwd=REPO, capture_output=True)
    return out
