"""Single-layer benchmark (benchmarks/RESULTS.md#one-layer; the paper's Figure 3): one mixer layer with its projections.

D 2048, 16 heads x 128, G 2, L 16 (and 64), bf16 weights and activations, B·T = 131072 tokens,
T in {4K, 16K, 32K, 128K}. For each layer: fwd+bwd and prefill (forward, no grad) time, and one
decode step at B 32 after 4096 tokens: RAT's eager model step (RATMixer.decode), and the static step
around ratpt.ops.rat_decode_mixing (the Triton decode kernel for rat-triton) eager and CUDA-graphed.

Every layer runs eager unless its name ends in -compiled (rat-public is always compiled).

Layers:
  rat-triton      ratpt's RATMixer, model.kernels = triton (kernels/)
  rat-reference   ratpt's RATMixer, model.kernels = torch (pure-PyTorch ops, eager)
  rat-public      the public code's formulation, written here: fp32 scan inside chunks (an L-step
                  loop that torch.compile fuses), flex_attention over the chunk summaries with a block-causal mask
                  (returning its log-sum-exp) merged with the own-state score, all torch.compile'd
  attn-flash / attn-cudnn   ratpt's causal AttentionMixer with SDPA forced to one backend
  rnn             ratpt's RNN layer (RAT's projections minus q, k; one scan over T), eager
  NAME-compiled   any of the above with the whole layer torch.compile'd (norm, projections, gates,
                  residual fused by inductor; the RAT kernels stay opaque custom ops inside the graph)
  NAME-packed     a RAT layer over packed documents (data.document_masking), at 4K and 128K only: rows of
                  documents with log-normal lengths (mean 1K tokens, sigma 1), masked and unmasked fwd+bwd timed
                  side by side on the same inputs (their ratio: what masking costs)

    python benchmarks/layer.py --out benchmarks/results/layer.json     # on one GPU
    python benchmarks/layer.py --plot benchmarks/results/layer.json     # PNG beside it
    python benchmarks/layer.py --layers rat-triton-L16 --update benchmarks/results/layer.json
                                                    # re-measure some layers, keep the others' entries
    python benchmarks/layer.py --baseline-lengths 4096,131072   # baselines at the two ends only: faster
"""
import argparse
import json
import math
import sys
import time
import traceback

import torch
from torch import nn

from ratpt_kernels.tune import time_ms

D, HEAD_DIM, G, TOKENS = 2048, 128, 2, 131072
COMPILED = "-compiled"  # suffix of a layer name: the whole layer torch.compile'd (static shapes)
PACKED = "-packed"  # suffix of a RAT layer's name: over packed documents, masked beside unmasked
PACKED_LENGTHS = (4096, 131072)
LENGTHS = (4096, 16384, 32768, 131072)
DTYPE = torch.bfloat16


# ----------------------------------------------------------------------------- layers
def rat_layer(L: int, kernels: str) -> nn.Module:
    from ratpt.model.config import ModelConfig
    from ratpt.model.rat import RATMixer

    layer = RATMixer(ModelConfig(d_model=D, head_dim=HEAD_DIM, ngroups=G, chunk_size=L, kernels=kernels))
    layer.reset_gate_bias()
    return layer


def chunk_scan_loop(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """y[l] = a[l] y[l-1] + u[l] along dim 2 of [B, C, L, D] (fp32): L steps, fused by torch.compile."""
    states = [u[:, :, 0]]
    for step in range(1, u.shape[2]):
        states.append(a[:, :, step] * states[-1] + u[:, :, step])
    return torch.stack(states, 2)


class PublicRAT(nn.Module):
    """The public RAT code's formulation around a ratpt RATMixer's weights."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer
        self._masks = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        m, (B, T, _) = self.mixer, x.shape
        L, H, d = m.chunk_size, m.n_heads, m.head_dim
        C = T // L
        z, v, f, q, k = m._split(x)
        g = torch.sigmoid(f.float() + m.gate_bias.float()).view(B, C, L, D)
        k = k.repeat(1, 1, H // G)
        v_state = chunk_scan_loop(g, (1 - g) * v.float().reshape(B, C, L, D)).view(B, T, D).to(x.dtype)
        k_state = chunk_scan_loop(g, (1 - g) * k.float().reshape(B, C, L, D)).view(B, T, D).to(x.dtype)
        from ratpt import ops
        cos, sin = ops.rope_cos_sin(torch.arange(T, device=x.device) // L, d, m.rope_base, x.dtype)
        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, d]
            return t.reshape(B, T, H, d).transpose(1, 2)

        q_rot = ops.apply_rope(heads(q.repeat(1, 1, H // G)), cos, sin)
        k_rot = ops.apply_rope(heads(k_state), cos, sin)
        v_heads = heads(v_state)
        o, lse = flex_attention(q_rot, k_rot[:, :, L - 1::L], v_heads[:, :, L - 1::L],
                                block_mask=self._masks[(T, L)], return_lse=True)
        own = torch.einsum("bhtd,bhtd->bht", q_rot.float(), k_rot.float()) / math.sqrt(d)
        top = torch.maximum(lse, own)
        w_sum, w_own = torch.exp(lse - top), torch.exp(own - top)
        y = (w_sum.unsqueeze(-1) * o.float() + w_own.unsqueeze(-1) * v_heads.float()) / (w_sum + w_own).unsqueeze(-1)
        return x + m.out_proj(z * y.to(x.dtype).transpose(1, 2).reshape(B, T, H * d))

    def prepare(self, T: int) -> None:
        from torch.nn.attention.flex_attention import create_block_mask

        L = self.mixer.chunk_size
        if (T, L) not in self._masks:
            self._masks[(T, L)] = create_block_mask(lambda b, h, q, kv: kv < q // L, None, None, T, T // L,
                                                    device="cuda")


class RNNLayer(nn.Module):
    """ratpt's RNN layer (its scan is ratpt.ops.chunk_scan over the whole sequence)."""

    def __init__(self):
        super().__init__()
        from ratpt.model.config import ModelConfig
        from ratpt.model.rnn import RNNMixer

        self.rnn = RNNMixer(ModelConfig(d_model=D, head_dim=HEAD_DIM))
        self.rnn.reset_gate_bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)


def attention_layer() -> nn.Module:
    from ratpt.model.attention import AttentionMixer
    from ratpt.model.config import ModelConfig

    return AttentionMixer(ModelConfig(d_model=D, head_dim=HEAD_DIM))


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name])


# ----------------------------------------------------------------------------- timing
def measure_sequence(name: str, layer: nn.Module, T: int, context, iters: int) -> dict:
    B = TOKENS // T
    x = torch.randn(B, T, D, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)
    forward = layer
    if isinstance(layer, PublicRAT):
        layer.prepare(T)
    if name.startswith("rat-public") or name.endswith(COMPILED):
        forward = torch.compile(layer, dynamic=False)

    def train_step():
        with context():
            out = forward(x)
            out.backward(dy)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    def prefill():
        with torch.no_grad(), context():
            forward(x)

    torch.cuda.reset_peak_memory_stats()
    fwd_bwd = time_ms(train_step, iters, warmup=2)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"fwd_bwd_ms": fwd_bwd, "prefill_ms": time_ms(prefill, iters, warmup=2), "peak_gib": peak, "B": B}


def packed_positions(B: int, T: int, mean: float = 1024.0, sigma: float = 1.0, seed: int = 0) -> torch.Tensor:
    """positions [B, T] of rows packed end to end with documents of log-normal lengths (mean `mean` tokens),
    the last one of a row cut at T, as the packer cuts them."""
    gen = torch.Generator().manual_seed(seed)
    mu = math.log(mean) - sigma ** 2 / 2  # the log-normal's mean is exp(mu + sigma²/2)
    rows = []
    for _ in range(B):
        pieces, filled = [], 0
        while filled < T:
            length = min(max(1, int(torch.empty(1).log_normal_(mu, sigma, generator=gen))), T - filled)
            pieces.append(torch.arange(length))
            filled += length
        rows.append(torch.cat(pieces))
    return torch.stack(rows)


def measure_packed(layer: nn.Module, T: int, iters: int) -> dict:
    """fwd+bwd of a RAT layer over packed documents (masked) and over the same rows unmasked, alternated."""
    from ratpt.ops.documents import separate_documents

    B = TOKENS // T
    x = torch.randn(B, T, D, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)
    positions = packed_positions(B, T).cuda()

    def train_step(positions):  # the chunk table as a model builds it once per forward, here for its one layer
        layer(x, separate_documents(positions, layer.chunk_size)).backward(dy)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    torch.cuda.reset_peak_memory_stats()
    masked = time_ms(lambda: train_step(positions), iters, warmup=2)
    peak = torch.cuda.max_memory_allocated() / 2**30
    unmasked = time_ms(lambda: train_step(None), iters, warmup=2)
    return {"fwd_bwd_ms": masked, "unmasked_fwd_bwd_ms": unmasked, "masked_over_unmasked": masked / unmasked,
            "documents": int((positions == 0).sum()), "peak_gib": peak, "B": B}


# ----------------------------------------------------------------------------- decode
def rat_static_decode(layer, x, cache, positions):
    """One RAT decode step with static shapes (CUDA-graph safe): ratpt.ops.rat_decode_mixing between
    the layer's projections, the caches updated in place, no host sync. positions [B] is read only."""
    from ratpt import ops

    z, v, f, q, k = (t[:, 0] for t in layer._split(x))
    y = ops.rat_decode_mixing(q, k, v, f, layer.gate_bias, cache.summary_k, cache.summary_v, cache.running_k,
                              cache.running_v, positions, layer.chunk_size, layer.head_dim, layer.rope_base,
                              kernels=layer.kernels)
    return x + layer.out_proj((z * y).unsqueeze(1))


def graphed(fn, iters: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, iters, warmup=5)


def measure_decode(name: str, layer: nn.Module, iters: int, B: int = 32, T: int = 4096) -> dict:
    from ratpt.model.cache import KVCache, RATCache, RNNCache

    x = torch.randn(B, 1, D, device="cuda", dtype=DTYPE)
    positions = torch.full((B,), T, device="cuda", dtype=torch.long)
    H = D // HEAD_DIM
    result = {}
    with torch.no_grad():
        if name.startswith("rat"):
            L = layer.chunk_size
            cap = T // L + 1
            cache = RATCache(torch.randn(B, H, cap, HEAD_DIM, device="cuda", dtype=DTYPE),
                             torch.randn(B, H, cap, HEAD_DIM, device="cuda", dtype=DTYPE),
                             torch.randn(B, D, device="cuda"), torch.randn(B, D, device="cuda"), L)
            result["decode_ms"] = time_ms(lambda: layer.decode(x, cache, positions), iters, warmup=2)
            result["decode_static_ms"] = time_ms(lambda: rat_static_decode(layer, x, cache, positions), iters, warmup=2)
            result["decode_graph_ms"] = graphed(lambda: rat_static_decode(layer, x, cache, positions), iters)
        elif name.startswith("attn"):
            cache = KVCache(torch.randn(B, H, T + 1, HEAD_DIM, device="cuda", dtype=DTYPE),
                            torch.randn(B, H, T + 1, HEAD_DIM, device="cuda", dtype=DTYPE))
            with sdpa_backend("flash" if name == "attn-flash" else "cudnn"):
                try:
                    result["decode_ms"] = time_ms(lambda: layer.decode(x, cache, positions), iters, warmup=2)
                except RuntimeError:  # a backend without masks: let SDPA choose
                    pass
            if "decode_ms" not in result:
                result["decode_ms"] = time_ms(lambda: layer.decode(x, cache, positions), iters, warmup=2)
                result["decode_note"] = "SDPA default backend (forced backend has no mask support)"
        elif name == "rnn":
            cache = RNNCache(torch.randn(B, D, device="cuda"))
            result["decode_ms"] = time_ms(lambda: layer.rnn.decode(x, cache, positions), iters, warmup=2)
            result["decode_graph_ms"] = graphed(lambda: layer.rnn.decode(x, cache, positions), iters)
    return result


# ----------------------------------------------------------------------------- driver
def build(name: str) -> tuple[nn.Module, object]:
    from contextlib import nullcontext

    L = int(name.split("-L")[1].split("-")[0]) if "-L" in name else 0
    if name.startswith("rat-triton"):
        return rat_layer(L, "triton"), nullcontext
    if name.startswith("rat-reference"):
        return rat_layer(L, "torch"), nullcontext
    if name.startswith("rat-public"):
        return PublicRAT(rat_layer(L, "torch")), nullcontext
    if name.startswith("attn"):
        return attention_layer(), lambda: sdpa_backend(name.split("-")[1])
    if name.startswith("rnn"):
        return RNNLayer(), nullcontext
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/layer.json")
    parser.add_argument("--layers", default="rat-triton-L16-compiled,rat-triton-L16,rat-triton-L16-packed,"
                                            "rat-triton-L64,rat-public-L16,"
                                            "attn-cudnn-compiled,attn-cudnn,attn-flash,rnn-compiled,rnn,"
                                            "rat-reference-L16")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--baseline-lengths", default=",".join(map(str, LENGTHS)),
                        help="the lengths (of --lengths) at which layers other than rat-triton-L16* run; "
                             "4096,131072, the two ends, saves device time")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="skip what would start after this many seconds (a leased machine's call limit)")
    parser.add_argument("--plot", help="only draw the PNG of an existing JSON")
    parser.add_argument("--update", help="an existing JSON: replace what this run measures (layers × lengths, "
                                         "decode), keep the rest")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
        return
    start = time.time()
    torch._dynamo.config.cache_size_limit = 64  # a compiled layer: one graph per length and grad mode
    import triton
    results = {"layers": {}}
    if args.update:
        with open(args.update) as fh:
            results = json.load(fh)
        for name in args.layers.split(","):  # what this run measures is replaced; other lengths stay
            entry = results["layers"].get(name, {})
            for key in [*args.lengths.split(","), "decode"]:
                entry.pop(key, None)
        results.pop("notes", None)  # provenance notes of hand-merged entries no longer hold
    results["updated" if args.update else "date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results.update({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "config": {"D": D, "heads": D // HEAD_DIM, "head_dim": HEAD_DIM, "G": G, "tokens": TOKENS,
                               "dtype": "bf16", "iters": args.iters, "timing": "median of CUDA-event times"}})
    for name in args.layers.split(","):
        entry = results["layers"].setdefault(name, {})
        layer, context = build(name)
        layer = layer.to("cuda", DTYPE)
        for T in map(int, args.lengths.split(",")):
            if not name.startswith("rat-triton-L16") and str(T) not in args.baseline_lengths.split(","):
                continue
            if name.endswith(PACKED) and T not in PACKED_LENGTHS:
                continue
            if time.time() - start > args.budget_s:
                entry[str(T)] = {"skipped": "time budget"}
                continue
            try:
                entry[str(T)] = (measure_packed(layer, T, args.iters) if name.endswith(PACKED)
                                 else measure_sequence(name, layer, T, context, args.iters))
            except Exception as error:  # record and go on: one failing baseline must not stop the run
                entry[str(T)] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
                traceback.print_exc()
            print(name, T, entry[str(T)], f"{time.time() - start:.0f}s", flush=True)
            torch.cuda.empty_cache()
        if (not name.startswith("rat-public") and not name.endswith((COMPILED, PACKED))
                and time.time() - start < args.budget_s):
            try:
                entry["decode"] = measure_decode(name, layer, 50)
            except Exception as error:
                entry["decode"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
                traceback.print_exc()
            print(name, "decode", entry["decode"], flush=True)
        del layer
        torch.cuda.empty_cache()
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    print(json.dumps(results, indent=1))


def plot(path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.load(open(path))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("fwd_bwd_ms", "prefill_ms"), ("training step (fwd+bwd)", "prefill (fwd)")):
        for name, entry in results["layers"].items():
            points = [(int(T), e[key]) for T, e in entry.items() if T.isdigit() and key in e]
            if points:
                ax.plot(*zip(*sorted(points)), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (B·T = 131072)")
        ax.set_ylabel("ms")
        ax.set_title(f"one layer, D {D}, {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=120)


if __name__ == "__main__":
    sys.exit(main())
