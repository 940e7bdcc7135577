"""Typed configuration of a RAT-family language model (DESIGN §1).

Defaults are the paper's RAT-1.3B; YAML files under configs/ state only what differs.
"""
from dataclasses import dataclass, field

MIXERS = ("rat", "attention", "swa", "rnn")


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
