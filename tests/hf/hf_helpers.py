"""Helpers of the Hugging Face tests: small ratpt models with every weight away from its init."""
import torch

from ratpt.model import ModelConfig, build_model
from ratpt.model.lm import RATLM

VOCAB = 300  # >= the byte tokenizer's 257


def small_config(mixers: list[str], **overrides) -> ModelConfig:
    """4 heads of 8 in 2 groups, chunks of 4, a window of 5: T = 23 covers partial chunks and a full window."""
    fields = dict(vocab_size=VOCAB, d_model=32, n_layers=len(mixers) if len(mixers) > 1 else 2, head_dim=8,
                  ngroups=2, chunk_size=4, mixers=mixers, window=5, rnn_gate_horizon=64)
    return ModelConfig(**(fields | overrides))


def random_model(cfg: ModelConfig, seed: int = 0) -> RATLM:
    """A model of `cfg` whose weights (norms and gate biases included) are all perturbed, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def hf_model_of(model: RATLM):
    """The RATForCausalLM with `model`'s config and weights (built in-process, no folder)."""
    from dataclasses import asdict

    from ratpt.hf.configuration_rat import RATConfig
    from ratpt.hf.modeling_rat import RATForCausalLM

    hf_model = RATForCausalLM(RATConfig(**asdict(model.cfg))).eval()
    hf_model.model.load_state_dict(model.state_dict())
    return hf_model
