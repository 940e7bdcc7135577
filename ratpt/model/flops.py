"""Forward FLOPs per token, per layer type, for honest MFU on every architecture.

Counts what the code multiplies: each matmul of [m, k] by [k, n] is 2·m·n·k. Projections are
per token; the softmax products (scores q·kᵀ and probabilities · values, 2·d each per head and
key) depend on how many keys a token may see, averaged over the T tokens of a sequence:

    attention      t + 1 keys (itself and every earlier token)
    sliding window min(t, W) + 1 keys
    RAT            c + 1 keys at chunk c = t // L (earlier chunk summaries and its own state)
    RNN            none (the recurrence is elementwise)

`full_square=True` instead counts every (query, key) pair the dense product would touch
(T keys for attention, W + 1 for a window, T/L + 1 for RAT): what a kernel that ignores the
mask performs. Elementwise work (norms, gates, the scan, softmax) is not counted, as usual.
Training is 3 × forward (backward = 2 × forward for matmuls).
"""
from ratpt.model.config import ModelConfig, mixer_of_layer
from ratpt.model.ffn import ffn_hidden


def keys_per_token(kind: str, cfg: ModelConfig, seq_len: int, full_square: bool = False) -> float:
    """Average number of keys each query's softmax covers, over a sequence of seq_len tokens."""
    T = seq_len
    if kind == "rnn":
        return 0.0
    if kind == "attention":
        return float(T) if full_square else (T + 1) / 2
    if kind == "swa":
        W = cfg.window
        if full_square:
            return float(min(W + 1, T))
        near = min(T, W + 1)  # tokens t <= W see t + 1 keys, later ones W + 1
        return (near * (near + 1) / 2 + (T - near) * (W + 1)) / T
    if kind == "rat":
        L = cfg.chunk_size
        if full_square:
            return T // L + 1.0
        full, rest = divmod(T, L)
        earlier = L * full * (full - 1) / 2 + rest * full  # sum over t of t // L
        return earlier / T + 1
    raise ValueError(f"unknown mixer {kind!r}")


def projection_flops_per_token(kind: str, cfg: ModelConfig) -> float:
    """in_proj + out_proj of one mixer layer."""
    D = cfg.d_model
    rows = {"rat": 3 * D + 2 * cfg.ngroups * cfg.head_dim, "attention": 3 * D, "swa": 3 * D, "rnn": 3 * D}
    if kind not in rows:
        raise ValueError(f"unknown mixer {kind!r}")
    return 2.0 * D * rows[kind] + 2.0 * D * D


def mixer_flops_per_token(kind: str, cfg: ModelConfig, seq_len: int, full_square: bool = False) -> float:
    """One mixer layer: projections + score and value products (4·D per visible key)."""
    return projection_flops_per_token(kind, cfg) + 4.0 * cfg.d_model * keys_per_token(kind, cfg, seq_len, full_square)


def ffn_flops_per_token(cfg: ModelConfig) -> float:
    """One FFN: fc1 (F or 2F outputs) and fc2."""
    hidden = ffn_hidden(cfg)
    fc1_out = 2 * hidden if cfg.ffn == "swiglu" else hidden
    return 2.0 * cfg.d_model * fc1_out + 2.0 * hidden * cfg.d_model


def head_flops_per_token(cfg: ModelConfig) -> float:
    """The tied output head; the embedding is a lookup (0 FLOPs)."""
    return 2.0 * cfg.d_model * cfg.vocab_size


def flops_breakdown(cfg: ModelConfig, seq_len: int, full_square: bool = False) -> dict[str, float]:
    """Forward FLOPs per token summed over the layers of each type: rat, attention, swa, rnn,
    ffn, embedding, head (types absent from the model are 0)."""
    out = {"rat": 0.0, "attention": 0.0, "swa": 0.0, "rnn": 0.0, "ffn": 0.0, "embedding": 0.0,
           "head": head_flops_per_token(cfg)}
    for layer in range(cfg.n_layers):
        kind = mixer_of_layer(cfg, layer)
        out[kind] += mixer_flops_per_token(kind, cfg, seq_len, full_square)
        out["ffn"] += ffn_flops_per_token(cfg)
    return out


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, full_square: bool = False) -> float:
    return sum(flops_breakdown(cfg, seq_len, full_square).values())


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward (3 × forward), mask-aware: the FLOPs MFU should be measured with."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)
