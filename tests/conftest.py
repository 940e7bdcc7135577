"""Shared pytest setup: GPU tests skip cleanly on machines without CUDA, and Triton kernels run
in its interpreter there.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined, i.e. before the first
test module imports ratpt (whose ops import the kernels): this root conftest is loaded first.
"""
import os
from pathlib import Path

import pytest
import torch

from run_helpers import train_here

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
    """CPython's doc topics, byte-tokenized once per session by the data_prep command line (in this process)."""
    from data_prep.__main__ import main as data_prep

    out = tmp_path_factory.mktemp("data") / "pydoc"
    assert data_prep(["tokenize", "pydoc", "--out", str(out), "--tokenizer", "byte", "--val-fraction", "0.05"]) == 0
    return out


@pytest.fixture(scope="session")
def trained_run(byte_data, tmp_path_factory) -> Path:
    """The folder of a finished 2-step run of run_helpers.small_run, trained once per session for the tests
    that export it, resume it or refuse to; a test that may change the folder takes a copy."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_here(byte_data, run_dir, "train.steps=2")
    return run_dir
