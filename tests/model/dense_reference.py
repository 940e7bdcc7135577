"""An independent, dense re-statement of docs/design.md#the-rat-layer for tests (float64, tiny shapes only).

Works on reference-format weights (CLAIRE-Labo/RAT key names) so it checks both the RAT math and
the converter. Everything is written differently from ratpt on purpose: a Python loop for the
recurrence, complex numbers for RoPE, an explicit T×T mask from the visibility rule (earlier chunks'
summaries and the token's own state), and per-head group indices (head h uses group h mod G).
"""
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Half-split RoPE as complex multiplication: pair i is (x[i], x[i + d/2])."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    phase = torch.polar(torch.ones(len(positions), d // 2, dtype=torch.float64),
                        positions.double()[:, None] * theta)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * phase
    return torch.cat((z.real, z.imag), dim=-1)


def rat_visible(T: int, L: int) -> torch.Tensor:
    """mask[t, s]: token t sees position s iff s == t, or s ends a chunk before t's chunk."""
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    return (s == t) | ((s % L == L - 1) & (s // L < t // L))


def attention_visible(T: int, window: int | None) -> torch.Tensor:
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    allowed = s <= t
    return allowed if window is None else allowed & (t - s <= window)


def gated_recurrence(x: torch.Tensor, g: torch.Tensor, L: int) -> torch.Tensor:
    """x, g [T, D]: state reset at t % L == 0."""
    out, state = [], torch.zeros_like(x[0])
    for t in range(x.shape[0]):
        state = (g[t] * state if t % L else 0) + (1 - g[t]) * x[t]
        out.append(state)
    return torch.stack(out)


def softmax_heads(q, k, v, visible):
    """q, k, v [H, T, d]; visible [T, T] -> [T, H·d]."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ v).transpose(0, 1).reshape(q.shape[1], -1)


def rat_layer(x: torch.Tensor, w: dict, L: int, head_dim: int, ngroups: int) -> torch.Tensor:
    """One RAT layer on x [T, D] with reference weights in_proj/gate_bias/input_norm/out_proj."""
    T, D = x.shape
    H, d, G = D // head_dim, head_dim, ngroups
    proj = rms_norm(x, w["input_norm.weight"]) @ w["in_proj.weight"].T
    z, v, f = proj[:, :D], proj[:, D:2 * D], proj[:, 2 * D:3 * D]
    q_groups = proj[:, 3 * D:3 * D + G * d].reshape(T, G, d)
    k_groups = proj[:, 3 * D + G * d:].reshape(T, G, d)
    group_of_head = torch.tensor([h % G for h in range(H)])
    q, k = q_groups[:, group_of_head], k_groups[:, group_of_head]  # [T, H, d]
    g = torch.sigmoid(f + w["gate_bias"])
    v_state = gated_recurrence(v, g, L).reshape(T, H, d)
    k_state = gated_recurrence(k.reshape(T, D), g, L).reshape(T, H, d)
    chunk = torch.arange(T) // L
    qh = rotate(q.transpose(0, 1), chunk)
    kh = rotate(k_state.transpose(0, 1), chunk)
    y = softmax_heads(qh, kh, v_state.transpose(0, 1), rat_visible(T, L))
    return x + (torch.sigmoid(z) * y) @ w["out_proj.weight"].T


def attention_layer(x: torch.Tensor, w: dict, head_dim: int, window: int | None) -> torch.Tensor:
    T, D = x.shape
    H = D // head_dim
    proj = rms_norm(x, w["input_norm.weight"]) @ w["in_proj.weight"].T
    v, q, k = (proj[:, i * D:(i + 1) * D].reshape(T, H, head_dim).transpose(0, 1) for i in range(3))
    pos = torch.arange(T)
    y = softmax_heads(rotate(q, pos), rotate(k, pos), v, attention_visible(T, window))
    return x + y @ w["out_proj.weight"].T


def rnn_layer(x: torch.Tensor, w: dict) -> torch.Tensor:
    T, D = x.shape
    proj = rms_norm(x, w["input_norm.weight"]) @ w["in_proj.weight"].T
    z, v, f = proj[:, :D], proj[:, D:2 * D], proj[:, 2 * D:]
    state = gated_recurrence(v, torch.sigmoid(f + w["gate_bias"]), T)
    return x + (torch.sigmoid(z) * state) @ w["out_proj.weight"].T


def reference_lm_logits(state: dict, tokens: torch.Tensor, mixers: list[str], L: int, head_dim: int,
                        ngroups: int, window: int) -> torch.Tensor:
    """Logits [T, vocab] of a reference-format model (keys as in the released checkpoints)."""
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    emb = state["embedding.wte.weight"]
    x = emb[tokens]
    n_layers = len({k.split(".")[2] for k in state if k.startswith("backbone.layers.")})
    for i in range(n_layers):
        prefix = f"backbone.layers.{i}."
        seq = {k[len(prefix + "seq_layer."):]: v for k, v in state.items() if k.startswith(prefix + "seq_layer.")}
        kind = mixers[i % len(mixers)]
        if kind == "rat":
            x = rat_layer(x, seq, L, head_dim, ngroups)
        elif kind == "rnn":
            x = rnn_layer(x, seq)
        else:
            x = attention_layer(x, seq, head_dim, window if kind == "swa" else None)
        h = rms_norm(x, state[prefix + "hidden_layer.ln.weight"]) @ state[prefix + "hidden_layer.fc1.weight"].T
        x = x + torch.nn.functional.gelu(h) @ state[prefix + "hidden_layer.fc2.weight"].T
    return rms_norm(x, state["backbone.ln.weight"]) @ state["head.lm_head.weight"].T


def random_reference_state(vocab: int, D: int, n_layers: int, mixers: list[str], head_dim: int,
                           ngroups: int, ffn: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised checkpoint 'task' dict in the reference layout (float64)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.3):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    emb = rand(vocab, D)
    state = {"embedding.wte.weight": emb, "backbone.ln.weight": 1 + rand(D, std=0.1), "head.lm_head.weight": emb}
    for i in range(n_layers):
        kind = mixers[i % len(mixers)]
        p = f"backbone.layers.{i}."
        rows = 3 * D + (2 * ngroups * head_dim if kind == "rat" else 0)
        state[p + "seq_layer.in_proj.weight"] = rand(rows, D)
        state[p + "seq_layer.input_norm.weight"] = 1 + rand(D, std=0.1)
        state[p + "seq_layer.out_proj.weight"] = rand(D, D)
        if kind in ("rat", "rnn"):
            state[p + "seq_layer.gate_bias"] = rand(D, std=1.0)
        state[p + "hidden_layer.fc1.weight"] = rand(ffn, D)
        state[p + "hidden_layer.fc2.weight"] = rand(D, ffn)
        state[p + "hidden_layer.ln.weight"] = 1 + rand(D, std=0.1)
    return state
