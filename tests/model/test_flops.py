"""FLOP accounting per layer type against the matmuls the code actually runs and the masks."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dense_reference import attention_visible, rat_visible
from ratpt.model import ModelConfig, build_model
from ratpt.model.flops import (flops_breakdown, forward_flops_per_token, keys_per_token,
                               mixer_flops_per_token, projection_flops_per_token,
                               training_flops_per_token)

PATTERNS = [["rat"], ["attention"], ["swa"], ["rnn"], ["rat", "swa"]]


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
@pytest.mark.parametrize("mixers", PATTERNS, ids=lambda m: "+".join(m))
def test_linear_flops_match_counted_matmuls(mixers, ffn):
    """Every aten.mm the forward runs (projections, FFN, head) is what flops.py counts."""
    cfg = ModelConfig(vocab_size=37, d_model=16, n_layers=3, head_dim=4, ngroups=2, chunk_size=4,
                      mixers=mixers, window=3, ffn=ffn)
    model = build_model(cfg)
    B, T = 2, 12
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 37, (B, T)))
    counted_mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    mixing = {kind: 4.0 * cfg.d_model * keys_per_token(kind, cfg, T) for kind in ("rat", "attention", "swa", "rnn")}
    breakdown = flops_breakdown(cfg, T)
    linear_only = sum(breakdown.values()) - sum(
        mixing[m] for m in (cfg.mixers[i % len(cfg.mixers)] for i in range(cfg.n_layers)))
    assert counted_mm == pytest.approx(B * T * linear_only, rel=1e-12)


def test_linear_flops_are_twice_the_matmul_parameters_at_paper_scale():
    cfg = ModelConfig(mixers=["rat", "swa"])  # RAT+SWA 1.3B
    with torch.device("meta"):
        model = build_model(cfg)
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    mixing = sum(4.0 * cfg.d_model * keys_per_token(cfg.mixers[i % 2], cfg, 4096) for i in range(cfg.n_layers))
    expected = 2.0 * (linear_params + cfg.vocab_size * cfg.d_model) + mixing
    assert forward_flops_per_token(cfg, 4096) == pytest.approx(expected, rel=1e-12)
    assert training_flops_per_token(cfg, 4096) == pytest.approx(3 * expected, rel=1e-12)


@pytest.mark.parametrize("T", [1, 7, 16, 29], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("L", [1, 4, 5], ids=lambda l: f"L{l}")
def test_rat_keys_per_token_counts_the_design_mask(L, T):
    cfg = ModelConfig(chunk_size=L)
    assert keys_per_token("rat", cfg, T) * T == pytest.approx(rat_visible(T, L).sum().item())


@pytest.mark.parametrize("T", [1, 7, 29], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("W", [1, 4, 50], ids=lambda w: f"W{w}")
def test_window_and_causal_keys_per_token_count_the_masks(W, T):
    cfg = ModelConfig(window=W)
    assert keys_per_token("swa", cfg, T) * T == pytest.approx(attention_visible(T, W).sum().item())
    assert keys_per_token("attention", cfg, T) * T == pytest.approx(attention_visible(T, None).sum().item())
    assert keys_per_token("attention", cfg, T, full_square=True) == T


def test_rat_mixing_is_about_l_times_cheaper_than_attention_at_long_context():
    cfg = ModelConfig(chunk_size=16)
    T = 65536
    rat = mixer_flops_per_token("rat", cfg, T) - projection_flops_per_token("rat", cfg)
    attention = mixer_flops_per_token("attention", cfg, T) - projection_flops_per_token("attention", cfg)
    assert attention / rat == pytest.approx(16, rel=0.01)
    assert mixer_flops_per_token("rnn", cfg, T) == projection_flops_per_token("rnn", cfg)
