"""Shared pytest setup: GPU tests skip cleanly on machines without CUDA, and Triton kernels run
in its interpreter there.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined, i.e. before the first
test module imports ratpt (whose ops import the kernels): this root conftest is loaded first.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run_helpers import REPO

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory) -> Path:
    """CPython's doc topics, byte-tokenized once per session by the real data_prep CLI."""
    out = tmp_path_factory.mktemp("data") / "pydoc"
    subprocess.run([sys.executable, "-m", "data_prep", "tokenize", "pydoc", "--out", str(out),
                    "--tokenizer", "byte", "--val-fraction", "0.05"], check=True, cwd=REPO, capture_output=True)
    return out
