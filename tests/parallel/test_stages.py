"""Pipeline stages are contiguous, non-empty and balanced by the per-layer FLOP count (ratpt.model.flops)."""
import itertools

import pytest

from ratpt.model.config import ModelConfig
from ratpt.parallel.pipeline import balanced_stages, layer_costs


def brute_force_best(costs, stages, last_extra):
    """The smallest largest-stage cost over every way to cut the layers into contiguous runs."""
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        runs = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
        runs[-1] += last_extra
        best = min(best, max(runs))
    return best


@pytest.mark.parametrize("costs, stages, last_extra", [
    ([1, 1, 1, 1], 2, 0.0),
    ([1, 1, 1, 1], 4, 0.0),
    ([5, 1, 1, 1, 1, 1], 2, 0.0),
    ([1, 2, 3, 4, 5, 6, 7], 3, 4.0),  # a heavy head pulls layers off the last stage
    ([3, 1, 4, 1, 5, 9, 2, 6], 4, 2.5),
])
def test_stages_are_contiguous_non_empty_and_minimise_the_largest_stage(costs, stages, last_extra):
    runs = balanced_stages(costs, stages, last_extra)
    assert [i for run in runs for i in run] == list(range(len(costs)))
    assert len(runs) == stages and all(runs)
    largest = max(sum(costs[i] for i in run) + (last_extra if k == stages - 1 else 0) for k, run in enumerate(runs))
    assert largest == pytest.approx(brute_force_best(costs, stages, last_extra))


def test_hybrid_attention_layers_count_more_than_rat_layers_at_long_sequences():
    cfg = ModelConfig(d_model=256, head_dim=64, n_layers=4, mixers=["rat", "attention"], vocab_size=1000)
    rat, attention = layer_costs(cfg, seq_len=8192)[:2]
    assert attention > rat  # T/2 keys per token against T/(2L) for RAT


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ValueError, match="cannot cut 2 layers into 3"):
        balanced_stages([1.0, 1.0], 3)
