"""train.compile_tuning: inductor's coordinate-descent tuning of the compiled blocks. Refused where
nothing would be tuned; the option is one inductor knows; a tuned block computes what the eager one does."""
import copy

import pytest
import torch
import torch._inductor

from ratpt.config import ConfigError, load_config
from ratpt.engines.compile import apply_compile, compile_options
from ratpt.model import build_model

VALID = ["data.streams=[{path: unused}]"]


@pytest.mark.parametrize("overrides", [["train.compile=false"], ["train.compile_backend=aot_eager"]],
                         ids=["not-compiled", "not-inductor"])
def test_tuning_without_inductor_compile_is_refused_naming_the_keys(overrides):
    with pytest.raises(ConfigError, match="train.compile_tuning tunes the kernels inductor generates"):
        load_config(None, VALID + ["train.compile_tuning=true"] + overrides)


def test_tuning_is_off_by_default_and_allowed_where_the_blocks_compile():
    assert not load_config(None, VALID).train.compile_tuning
    assert load_config(None, VALID + ["train.compile_tuning=true", "train.compile=auto"]).train.compile_tuning


def test_the_tuning_options_are_inductor_options_and_only_given_to_inductor():
    options = compile_options("inductor", True)
    assert options and set(options) <= set(torch._inductor.list_options())
    assert compile_options("inductor", False) is None and compile_options("aot_eager", True) is None


@pytest.mark.gpu
def test_a_tuned_compiled_model_computes_what_the_eager_one_does():
    cfg = load_config(None, VALID + ["model.d_model=256", "model.n_layers=2", "model.vocab_size=512",
                                     "model.kernels=triton"])
    eager = build_model(cfg.model).cuda()
    tuned = copy.deepcopy(eager)
    apply_compile(tuned, "inductor", tuning=True)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 256), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(tuned(tokens), eager(tokens), rtol=1e-4, atol=1e-4)
