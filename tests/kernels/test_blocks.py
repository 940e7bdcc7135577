"""The launch-configuration table: tune.py adopts the fastest configuration over all lengths, and
blocks.py then launches with it (and with its defaults for shapes the table does not cover)."""
import pytest
import torch

from ratpt_kernels import blocks, tune


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


def test_confirmation_rounds_decide_between_the_sweeps_finalists(table):
    sweep = [run("forward", T, bq, ms) for T, bq, ms in
             [(4096, 64, 5.0), (131072, 64, 19.0), (4096, 128, 5.0), (131072, 128, 20.0),
              (4096, 32, 6.0), (131072, 32, 30.0)]]
    assert tune.shortlist(sweep, 2) == {("forward", 16): [blocks.Blocks(64, 64, 8, 2), blocks.Blocks(128, 64, 8, 2)]}
    # interleaved re-timing: bq 64's sweep time was one fast moment, its median over rounds is slower
    rounds = {64: [(21.0, 5.1), (20.5, 5.0), (19.0, 5.2)], 128: [(20.0, 5.0), (19.9, 5.1), (25.0, 5.0)]}
    confirmed = [{**run("forward", T, bq, ms), "round": i}
                 for bq, timings in rounds.items() for i, pair in enumerate(timings)
                 for T, ms in zip((131072, 4096), pair)]
    assert {(r["bq"], r["T"]): r["ms"] for r in tune.medians(confirmed)} == {
        (64, 131072): 20.5, (64, 4096): 5.1, (128, 131072): 20.0, (128, 4096): 5.0}
    tune.write_table(tune.medians(confirmed), str(table))
    blocks.measured.cache_clear()
    assert blocks.blocks("forward", 16, 128, torch.bfloat16) == blocks.Blocks(128, 64, 8, 2)


def test_without_a_table_every_kernel_holds_whole_chunks(table):
    for kernel in ("forward", "query_grad"):
        for L in (1, 16, 64, 128):
            bq = blocks.blocks(kernel, L, 128, torch.bfloat16).bq
            assert bq >= L and bq % L == 0
