"""The RAT layer against docs/design.md#the-rat-layer: an independent dense float64 implementation, and its limits."""
import pytest
import torch

from dense_reference import rat_layer as dense_rat_layer
from ratpt.model.config import ModelConfig
from ratpt.model.rat import RATMixer
from ratpt.model.rnn import RNNMixer


def make_rat(L: int, G: int, D: int = 16, head_dim: int = 4, seed: int = 0) -> RATMixer:
    torch.manual_seed(seed)
    mixer = RATMixer(ModelConfig(d_model=D, head_dim=head_dim, ngroups=G, chunk_size=L)).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.4)
        mixer.input_norm.weight.add_(1)
    return mixer


@pytest.mark.parametrize("T", [1, 7, 12, 19], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("G", [1, 2, 4], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("L", [1, 3, 4, 16], ids=lambda l: f"L{l}")
def test_rat_layer_equals_dense_design_rule(L, G, T):
    mixer = make_rat(L, G)
    x = torch.randn(2, T, 16, dtype=torch.float64)
    weights = {name: p.detach() for name, p in mixer.named_parameters()}
    expected = torch.stack([dense_rat_layer(x[b], weights, L, head_dim=4, ngroups=G) for b in range(2)])
    torch.testing.assert_close(mixer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [5, 16], ids=lambda t: f"T{t}")
def test_rat_with_one_chunk_equals_rnn_layer(T):
    rat = make_rat(L=T, G=2)
    rnn = RNNMixer(ModelConfig(d_model=16, head_dim=4)).double()
    with torch.no_grad():
        rnn.in_proj.weight.copy_(rat.in_proj.weight[: 3 * 16])
        for name in ("gate_bias", "input_norm.weight", "out_proj.weight"):
            rnn.get_parameter(name).copy_(rat.get_parameter(name))
    x = torch.randn(3, T, 16, dtype=torch.float64)
    torch.testing.assert_close(rat(x), rnn(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("L", [1, 2, 16], ids=lambda l: f"L{l}")
def test_gate_bias_init_is_log_uniform_1_to_L_minus_1(L):
    mixer = RATMixer(ModelConfig(d_model=256, head_dim=64, chunk_size=L))
    mixer.reset_gate_bias()
    span = mixer.gate_bias.detach().exp()
    assert span.min() >= 1 - 1e-6 and span.max() <= max(L - 1, 1) + 1e-5
    if L > 3:
        assert span.max() - span.min() > (L - 2) / 2  # actually spread over the range


def test_query_key_groups_are_tiled_over_heads():
    """Head h uses group h mod G: changing group 0's q rows changes heads 0 and 2 only."""
    mixer = make_rat(L=4, G=2)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    seen = {}

    def record(module, args, output):
        seen["y"] = args[0]

    hook = mixer.out_proj.register_forward_hook(record)
    mixer(x)
    before = seen["y"].clone()
    with torch.no_grad():
        mixer.in_proj.weight[3 * 16: 3 * 16 + 4] += 1.0  # q of group 0
    mixer(x)
    hook.remove()
    changed = (seen["y"] - before).abs().view(1, 9, 4, 4).amax(dim=(0, 1, 3)) > 1e-12
    assert changed.tolist() == [True, False, True, False]
