"""The launch-configuration table: tune.py adopts the fastest configuration over all lengths, and
blocks.py then launches with it (and with its defaults for shapes the table does not cover)."""
import pytest
import torch

from kernels import blocks, tune


def run(kernel, T, bq, ms):
    return {"kernel": kernel, "L": 16, "T": T, "bq": bq, "bc": 64, "warps": 8, "stages": 2, "ms": ms}


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "blocks.json"
    monkeypatch.setattr(blocks, "TABLE", path)
    monkeypatch.setattr(blocks, "interpreting", lambda: False)  # the table is for compiled kernels
    blocks.measured.cache_clear()
    yield path
    blocks.measured.cache_clear()


def test_tuned_table_holds_the_least_total_time_over_lengths_and_blocks_uses_it(table):
    runs = [run("forward", 4096, 64, 5.0), run("forward", 131072, 64, 20.0),
            run("forward", 4096, 128, 4.0), run("forward", 131072, 128, 22.0),  # faster at 4K only
            run("forward", 4096, 256, 1.0),  # not measured at 128K: not eligible
            {**run("forward", 131072, 32, 0.0), "error": "out of resources"}]
    untuned = {key: blocks.blocks(*key, torch.bfloat16) for key in [("query_grad", 16, 128), ("forward", 64, 128)]}
    tune.write_table(runs, str(table))
    blocks.measured.cache_clear()
    assert blocks.blocks("forward", 16, 128, torch.bfloat16) == blocks.Blocks(64, 64, 8, 2)
    for key, config in untuned.items():  # kernels and shapes the sweep did not cover keep their defaults
        assert blocks.blocks(*key, torch.bfloat16) == config


def test_without_a_table_every_kernel_holds_whole_chunks(table):
    for kernel in ("forward", "query_grad"):
        for L in (1, 16, 64, 128):
            bq = blocks.blocks(kernel, L, 128, torch.bfloat16).bq
            assert bq >= L and bq % L == 0
