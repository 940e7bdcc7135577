"""Typed configuration of a RAT-family language model (docs/design.md#the-language-model).

Defaults are the paper's RAT-1.3B; YAML files under configs/ state only what differs.
"""
from dataclasses import dataclass, field

MIXERS = ("rat", "attention", "swa", "rnn")
KERNELS = ("auto", "torch", "triton")


@dataclass
class ModelConfig:
    vocab_size: int = 32000  # rows of the embedding (tied to the head); >= the tokenizer's vocab
    d_model: int = 2048  # model width D
    n_layers: int = 24  # number of blocks (mixer + FFN)
    head_dim: int = 128  # d; the number of heads is d_model / head_dim
    ngroups: int = 2  # G query/key groups shared by heads (head h uses group h mod G)
    chunk_size: int = 16  # L: RAT chunk length (L=1 attention-like, L=T an RNN)
    mixers: list[str] = field(default_factory=lambda: ["rat"])  # pattern cycled over layers: rat | attention | swa | rnn
    window: int = 1024  # W for sliding-window attention: a token sees itself and W earlier tokens
    ffn: str = "gelu"  # gelu (W2·GELU(W1·), paper) | swiglu
    ffn_mult: float = 4.0  # FFN hidden width as a multiple of d_model
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_base: float = 10000.0  # RoPE base (over chunk index for RAT, token index for attention)
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    rnn_gate_horizon: int = 4096  # RNN layer: gate_bias init log U(1, horizon-1) (reference: training seq_len)
    kernels: str = "auto"  # auto (Triton on CUDA) | torch | triton: RAT's sequence mixing and attention decode


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise ValueError naming the first inconsistent field and how to fix it.

    Checked at build time so that a bad YAML fails before any weight is allocated.
    """
    positive = ("vocab_size", "d_model", "n_layers", "head_dim", "ngroups", "chunk_size", "window",
                "rnn_gate_horizon")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"model.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.head_dim:
        raise ValueError(f"model.d_model ({cfg.d_model}) must be a multiple of model.head_dim "
                         f"({cfg.head_dim}); pick head_dim dividing d_model")
    if cfg.head_dim % 2:
        raise ValueError(f"model.head_dim ({cfg.head_dim}) must be even for RoPE")
    n_heads = cfg.d_model // cfg.head_dim
    if n_heads % cfg.ngroups:
        raise ValueError(f"model.ngroups ({cfg.ngroups}) must divide the number of heads "
                         f"d_model/head_dim = {n_heads}")
    if not cfg.mixers:
        raise ValueError(f"model.mixers must list at least one of {MIXERS}")
    for mixer in cfg.mixers:
        if mixer not in MIXERS:
            raise ValueError(f"model.mixers: unknown mixer {mixer!r}; choose from {MIXERS}")
    if cfg.ffn not in ("gelu", "swiglu"):
        raise ValueError(f"model.ffn must be 'gelu' or 'swiglu', got {cfg.ffn!r}")
    if cfg.ffn_mult <= 0 or round(cfg.ffn_mult * cfg.d_model) < 1:
        raise ValueError(f"model.ffn_mult must be > 0, got {cfg.ffn_mult}")
    if cfg.norm_eps <= 0:
        raise ValueError(f"model.norm_eps must be > 0, got {cfg.norm_eps}")
    if cfg.kernels not in KERNELS:
        raise ValueError(f"model.kernels must be one of {KERNELS}, got {cfg.kernels!r}")
    if cfg.rope_base <= 1:
        raise ValueError(f"model.rope_base must be > 1, got {cfg.rope_base}")


def mixer_of_layer(cfg: ModelConfig, layer: int) -> str:
    """The mixer of block `layer`: the `mixers` pattern cycled over layers (docs/design.md#the-language-model)."""
    return cfg.mixers[layer % len(cfg.mixers)]


def n_heads(cfg: ModelConfig) -> int:
    """Number of heads H = d_model / head_dim."""
    return cfg.d_model // cfg.head_dim
