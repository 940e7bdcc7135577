"""`RATConfig`: the Hugging Face configuration of a RAT-family language model (arXiv 2507.04416).

Its fields are those of ratpt's `ModelConfig`, by the same names and with the paper's RAT-1.3B
defaults, so that a model converts both ways without loss. This file is copied into every exported
folder and imported by transformers there, so it depends on transformers only.
"""
from transformers import PretrainedConfig

MIXERS = ("rat", "attention", "swa", "rnn")
KERNELS = ("auto", "torch", "triton")


class RATConfig(PretrainedConfig):
    model_type = "rat"
    # the names generic Hugging Face code (and lm-eval) reads
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers"}

    def __init__(
        self,
        vocab_size: int = 32000,  # rows of the embedding, tied to the head
        d_model: int = 2048,  # model width D
        n_layers: int = 24,  # blocks (mixer + FFN)
        head_dim: int = 128,  # d; heads H = d_model / head_dim
        ngroups: int = 2,  # RAT query/key groups G (head h uses group h mod G)
        chunk_size: int = 16,  # RAT chunk length L
        mixers: list[str] | None = None,  # pattern cycled over layers: rat | attention | swa | rnn (default ["rat"])
        window: int = 1024,  # sliding window W: a token sees itself and W earlier tokens
        ffn: str = "gelu",  # gelu (W2·GELU(W1·)) | swiglu
        ffn_mult: float = 4.0,  # FFN hidden width / d_model
        norm_eps: float = 1e-6,  # RMSNorm epsilon
        rope_base: float = 10000.0,  # RoPE base (chunk index for RAT, token index for attention)
        init_std: float = 0.02,  # std of the normal init of linear and embedding weights
        rnn_gate_horizon: int = 4096,  # RNN layer gate-bias init horizon (training only)
        kernels: str = "auto",  # RAT's forward and prefill on ratpt's Triton kernels where ratpt is installed: auto:
        #                         on CUDA; triton: on any device (the CPU in Triton's interpreter); torch: never.
        #                         Without ratpt: plain PyTorch
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.head_dim = head_dim
        self.ngroups = ngroups
        self.chunk_size = chunk_size
        self.mixers = ["rat"] if mixers is None else mixers if isinstance(mixers, str) else list(mixers)
        self.window = window
        self.ffn = ffn
        self.ffn_mult = ffn_mult
        self.norm_eps = norm_eps
        self.rope_base = rope_base
        self.init_std = init_std
        self.rnn_gate_horizon = rnn_gate_horizon
        self.kernels = kernels
        if not tie_word_embeddings:
            raise ValueError("RAT models tie the head to the embedding: tie_word_embeddings must be true")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate()

    @property
    def num_attention_heads(self) -> int:
        return self.d_model // self.head_dim

    def mixer_of_layer(self, layer: int) -> str:
        """The mixer of block `layer`: `mixers` cycled over the layers (["rat", "swa"] is the paper's hybrid)."""
        return self.mixers[layer % len(self.mixers)]

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot build a model, or would build one whose outputs
        are NaN (config.json is hand-editable: a quoted number or a float count must not reach PyTorch)."""
        for name in ("vocab_size", "d_model", "n_layers", "head_dim", "ngroups", "chunk_size", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RATConfig.{name} must be an integer >= 1, got {value!r}")
        for name, low in (("ffn_mult", 0), ("norm_eps", 0), ("rope_base", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > low:
                raise ValueError(f"RATConfig.{name} must be a number > {low}, got {value!r}")
        if self.d_model % self.head_dim or self.head_dim % 2:
            raise ValueError(f"RATConfig.head_dim ({self.head_dim}) must be even and divide d_model ({self.d_model})")
        if self.num_attention_heads % self.ngroups:
            raise ValueError(f"RATConfig.ngroups ({self.ngroups}) must divide the {self.num_attention_heads} heads")
        if isinstance(self.mixers, str) or not self.mixers or any(m not in MIXERS for m in self.mixers):
            raise ValueError(f"RATConfig.mixers must be a list of mixers from {MIXERS}, got {self.mixers!r}")
        if self.ffn not in ("gelu", "swiglu"):
            raise ValueError(f"RATConfig.ffn must be 'gelu' or 'swiglu', got {self.ffn!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"RATConfig.kernels must be one of {KERNELS}, got {self.kernels!r}")
