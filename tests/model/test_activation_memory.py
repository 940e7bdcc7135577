"""benchmarks/activation_memory.py counts a step's peak on fake tensors and extrapolates the depth from
one and two layers: the extrapolation must equal a direct count, and a checkpointed layer must keep
exactly its input. Three sequences, so that the layers' activations, not the head, make the peak (as
at the lengths the script is for)."""
import pytest

import activation_memory
from ratpt.config import load_config

TINY = ["data.seq_len=512", "train.compile=false", "model.kernels=torch", "model.d_model=64", "model.head_dim=32",
        "model.vocab_size=257"]


def tiny(config: str, checkpointing: bool, *extra: str):
    return load_config(activation_memory.REPO / "configs" / f"{config}.yaml",
                       [*TINY, f"train.activation_checkpointing={str(checkpointing).lower()}", *extra])


@pytest.mark.parametrize("config, period", [("attention_1p3b", 1), ("rat_swa_1p3b", 2)])  # the hybrid has RAT layers
@pytest.mark.parametrize("checkpointing", [False, True])
def test_periods_of_layers_add_equal_bytes_so_two_counts_give_any_depth(config, period, checkpointing):
    one, two, three = (activation_memory.step_peak_bytes(tiny(config, checkpointing, f"model.n_layers={n}"), batch=3)
                       for n in (period, 2 * period, 3 * period))
    assert three - two == two - one > 0


def test_a_checkpointed_layer_keeps_exactly_its_bf16_input():
    one, two = (activation_memory.step_peak_bytes(tiny("tiny", True, f"model.n_layers={n}"), batch=3) for n in (1, 2))
    assert two - one == 3 * 512 * 64 * 2
