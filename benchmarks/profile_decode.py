"""Where one decode step's time goes, per model: GPU kernels of a CUDA-graphed step (torch.profiler).

The step is benchmarks/generate.py's: a cache preallocated for prompt + new tokens, prefilled
from `--prefill-batch` prompts and repeated to the batch, one token per sequence, replayed as one
CUDA graph. After warmup replays, `--steps` replays run under the profiler; each GPU kernel's time
is averaged per step and summed into benchmarks/profile_step.py's categories. The cache bytes a
step reads (every visible summary or key/value slot, model dtype) over the mixing kernels' time
give their achieved bandwidth, to compare with the H200's ≈ 4.3 TB/s copy rate.

--sweep times the RAT decode kernel alone (ratpt_kernels.rat_decode, one layer of RAT-1.3B's shape at
the first model's batch and position, random caches, replayed in a CUDA graph over a step's layers) over
its launch configurations, to choose the defaults of kernels/rat_decode.py. --sweep-linear times each of
a RAT-1.3B layer's fused decode linears (ratpt_kernels.decode_linear) over its launches at every
--batches batch, beside the unfused cuBLAS path, to choose the defaults of kernels/decode_linear.py.
--read-floor times a kernel that only reads a layer's visible summaries (no softmax, no writes) beside the
decode kernel at the same batch and position, and the same read spanning 1, 2 and 4 layers in one launch:
what one launch of that many bytes can reach, and what each launch boundary costs.

    python benchmarks/profile_decode.py --models rat_1p3b,attention_1p3b --batches 2048,128 \
        --out benchmarks/results/profile_decode.json
    python benchmarks/profile_decode.py --sweep --batches 1 --out sweep.json
    python benchmarks/profile_decode.py --sweep-linear --batches 1,64 --out sweep_linear.json
    python benchmarks/profile_decode.py --read-floor --batches 64 --out read_floor.json
"""
from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

from generate import REPO, cache_bytes_read
from profiling import by_category, kernel_times, rat_kernel_names
from ratpt.config import load_config
from ratpt.decoder import GraphedDecodeStep, compile_decode
from ratpt.model import build_model
from ratpt.model.ffn import ffn_hidden
from ratpt.ops import decode_linear


@torch.inference_mode()
def profile_model(name: str, batch: int, args: argparse.Namespace) -> dict:
    cfg = load_config(REPO / "configs" / f"{name}.yaml", args.set)
    torch.manual_seed(0)
    model = build_model(cfg.model).to("cuda", torch.bfloat16).eval()
    if args.compile != "none":
        compile_decode(model, None if args.compile == "default" else args.compile)
    prompts = torch.randint(0, cfg.model.vocab_size, (args.prefill_batch, args.prompt), device="cuda")
    logits, cache = model.prefill(prompts, capacity=args.prompt + args.new)
    cache = cache.repeat_interleave(batch // args.prefill_batch)
    tokens = logits.repeat_interleave(batch // args.prefill_batch, 0).argmax(-1)
    step = GraphedDecodeStep(model, cache)
    for _ in range(args.warmup):
        tokens = step(tokens).argmax(-1)

    def decode() -> None:
        nonlocal tokens
        tokens = step(tokens).argmax(-1)

    launches: dict[str, float] = {}
    per_kernel = kernel_times(decode, args.steps, launches)  # after one more untimed step
    rat_names = rat_kernel_names()
    per_category = by_category(per_kernel, rat_names)
    mixing_ms = per_category["rat_mixing"] + per_category["attention"]
    position = args.prompt + args.warmup + 1 + args.steps // 2
    read = cache_bytes_read(cfg.model, batch, position, 2)
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {"model": name, "batch": batch, "compile": args.compile, "set": args.set, "position": position,
            "kernel_ms_per_step": sum(per_kernel.values()), "launches_per_step": round(sum(launches.values())),
            "by_category_ms": per_category, "cache_gb_read": read / 1e9,
            "mixing_tb_per_s": read / (mixing_ms / 1000) / 1e12 if mixing_ms else None,
            "top_kernels_ms": {k[:120]: round(v, 3) for k, v in top}}


def decode_layer_calls(batch: int, position: int, tokens: int) -> tuple[Callable[..., list], float]:
    """(launch keywords -> one RAT-1.3B layer's decode kernel calls, the layer's visible cache bytes) at
    `position`, random inputs. The calls cycle through copies of the caches (> 200 MB, at most a step's
    layers), so that none is read from the L2 cache."""
    from ratpt_kernels import rat_decode

    cfg = load_config(REPO / "configs" / "rat_1p3b.yaml").model
    D, d, G, L = cfg.d_model, cfg.head_dim, cfg.ngroups, cfg.chunk_size
    capacity = -(-tokens // L)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    q, k, v, f, z = rand(batch, G * d), rand(batch, G * d), rand(batch, D), rand(batch, D), rand(batch, D)
    bias = rand(D, dtype=torch.float32)
    copies = min(cfg.n_layers, -(-200 * 2**20 // (2 * 2 * batch * D * capacity)))
    caches = [[rand(batch, D // d, capacity, d), rand(batch, D // d, capacity, d),
               rand(batch, D, dtype=torch.float32), rand(batch, D, dtype=torch.float32)] for _ in range(copies)]
    positions = torch.full((batch,), position, device="cuda", dtype=torch.long)

    def calls(**launch) -> list:
        return [partial(rat_decode, q, k, v, f, bias, *cache, positions, L, d, cfg.rope_base, gate=z, **launch)
                for cache in caches]

    return calls, cache_bytes_read(cfg, batch, position, 2) / cfg.n_layers


def sweep_decode_launch(batch: int, position: int, tokens: int) -> list[dict]:
    """µs per call of one RAT-1.3B layer's decode kernel per launch (slots per loop step, warps, stages,
    programs per (sequence, head), tensor-core dots or FMAs; "default": the kernel's own choice) at `position`,
    replayed in a CUDA graph as in a decode step; TB/s is a layer's visible cache bytes over the time."""
    calls, read_bytes = decode_layer_calls(batch, position, tokens)
    names = ("slots", "warps", "stages", "splits", "dots")
    launches = [{}, *(dict(zip(names, launch)) for launch in
                      itertools.product((16, 32, 64), (2, 4, 8), (2, 3), (1, 2, 4, 8), (False, True)))]
    rows = []
    for launch in launches:
        us = graphed_us(calls(**launch))
        label = ("default" if not launch else "slots{slots}_w{warps}_s{stages}_splits{splits}_{kind}".format(
            **launch, kind="dots" if launch["dots"] else "fma"))
        rows.append({"launch": label, **launch, "us": us, "tb_per_s": read_bytes / us / 1e6})
        print(rows[-1], flush=True)
    return rows


@triton.jit
def _read_slabs(x_ptr, out_ptr, slab_stride, n, BLOCK: tl.constexpr):
    """Program i sums the first n elements of slab i: the decode kernel's reads of one (sequence, head)'s
    visible summaries, without its arithmetic or writes."""
    slab = x_ptr + tl.program_id(0).to(tl.int64) * slab_stride
    total = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        total += tl.load(slab + offsets, mask=offsets < n).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(total, 0))


def read_floor(batch: int, position: int, tokens: int) -> list[dict]:
    """µs per layer of RAT-1.3B's decode kernel (default launch) beside a read-only kernel over the same
    visible summaries (K and V of every (sequence, head): one program per slab), per block and warps, with
    1, 2 or 4 layers' summaries in one launch; replayed in a CUDA graph over > 200 MB, as the sweep. The
    gap to the decode kernel is its arithmetic and writes; the gap between 1 and 4 layers a launch is what
    a launch boundary costs at this size."""
    cfg = load_config(REPO / "configs" / "rat_1p3b.yaml").model
    calls, layer_bytes = decode_layer_calls(batch, position, tokens)
    us = graphed_us(calls())
    rows = [{"kernel": "rat_decode default", "layers_per_launch": 1, "us_per_layer": us,
             "tb_per_s": layer_bytes / us / 1e6}]
    print(rows[-1], flush=True)
    del calls
    capacity, visible = -(-tokens // cfg.chunk_size), (position // cfg.chunk_size) * cfg.head_dim
    slabs_per_layer = 2 * batch * cfg.d_model // cfg.head_dim  # K and V of every (sequence, head)
    for layers, block, warps in itertools.product((1, 2, 4), (1024, 4096, 8192), (4, 8)):
        copies = max(1, -(-200 * 2**20 // (2 * layers * slabs_per_layer * capacity * cfg.head_dim)))
        slabs = [torch.randn(layers * slabs_per_layer, capacity * cfg.head_dim, device="cuda", dtype=torch.bfloat16)
                 for _ in range(copies)]
        out = torch.empty(layers * slabs_per_layer, device="cuda", dtype=torch.float32)
        us = graphed_us([partial(_read_slabs[(x.shape[0],)], x, out, x.stride(0), visible, BLOCK=block,
                                 num_warps=warps) for x in slabs]) / layers
        rows.append({"kernel": f"read only, block {block}, {warps} warps", "layers_per_launch": layers,
                     "us_per_layer": us, "tb_per_s": layer_bytes / us / 1e6})
        print(rows[-1], flush=True)
        del slabs
    return rows


def graphed_us(calls: list, repeats: int = 5) -> float:
    """Microseconds per call of `calls` (argument-free functions) run in a row, replayed as one CUDA graph
    (the decode step is one): each call's launch gap is the graph's, not Python's."""
    for call in calls:  # compiles and sets up cuBLAS, which a capture cannot do
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    return cuda_us(graph.replay, repeats) / len(calls)


def cuda_us(call, repeats: int) -> float:
    """Microseconds per call of `call` (argument-free), by CUDA events around `repeats` calls in a row."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


def sweep_linear_launch(batches: list[int]) -> list[dict]:
    """µs per call of each fused decode linear of one RAT-1.3B layer, per launch (block_n, block_k, warps,
    stages, K split; "default": the kernel's default_launch, unsplit) and for the unfused cuBLAS path
    (ops.decode_linear's reference), at each batch. The calls cycle through > 200 MB of weight copies, so
    that none is read from the L2 cache; TB/s is the weight bytes over the time."""
    from ratpt_kernels import decode_linear as fused
    from ratpt_kernels.decode_linear import FMA_ROWS

    cfg = load_config(REPO / "configs" / "rat_1p3b.yaml").model
    D, F, qk = cfg.d_model, ffn_hidden(cfg), cfg.ngroups * cfg.head_dim
    layers = {"norm+in_proj": (3 * D + 2 * qk, D, True, "none", False),
              "out_proj+residual": (D, D, False, "none", True),
              "norm+fc1+gelu": (F, D, True, "gelu", False),
              "fc2+residual": (D, F, False, "none", True)}
    tile_launches = [(0, 0, 0, 0, 0), (16, 256, 4, 3, 1), (16, 512, 4, 3, 1), (32, 128, 4, 3, 1), (64, 64, 4, 4, 1),
                     (64, 128, 4, 3, 1), (16, 256, 4, 3, 2), (16, 256, 4, 3, 4), (32, 128, 4, 3, 4),
                     (64, 64, 4, 4, 2), (64, 64, 4, 4, 4), (16, 256, 4, 5, 4)]
    fma_launches = [(0, 0, 0, 0, 0), (4, 1024, 4, 2, 1), (8, 256, 4, 3, 1), (8, 512, 4, 2, 1), (8, 512, 4, 3, 1),
                    (8, 1024, 4, 2, 1), (8, 512, 8, 2, 1), (16, 256, 4, 3, 1), (16, 512, 4, 2, 1),
                    (16, 512, 8, 2, 1), (32, 256, 4, 2, 1), (8, 256, 4, 3, 2), (8, 512, 4, 2, 2),
                    (16, 256, 4, 3, 2), (8, 512, 4, 2, 4), (16, 512, 8, 2, 4), (8, 256, 2, 3, 1)]
    rows = []
    for batch, (name, (n, k, norm, activation, residual)) in itertools.product(batches, layers.items()):
        launches = fma_launches if batch <= FMA_ROWS else tile_launches
        copies = -(-200 * 2**20 // (2 * n * k))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
        g = torch.ones(k, device="cuda", dtype=torch.bfloat16) if norm else None
        r = torch.randn(batch, n, device="cuda", dtype=torch.bfloat16) if residual else None
        candidates = {"cublas": partial(decode_linear, x, norm_weight=g, activation=activation, residual=r,
                                        kernels="torch")}
        for launch in launches:
            label = "default" if launch[0] == 0 else "n{}_k{}_w{}_s{}_split{}".format(*launch)
            candidates[label] = lambda w, launch=launch: fused(x, w, g, 1e-6, activation, r, *launch)
        for label, fn in candidates.items():
            try:
                us = graphed_us([partial(fn, w) for w in weights])
            except Exception as error:  # a launch that does not compile or fit: recorded, the sweep goes on
                rows.append({"batch": batch, "layer": name, "launch": label, "error": str(error)[:200]})
            else:
                rows.append({"batch": batch, "layer": name, "launch": label, "us": us,
                             "tb_per_s": 2 * n * k / us / 1e6})
            print(rows[-1], flush=True)
    return rows


def plot_linear_sweep(path: Path) -> None:
    """The --sweep-linear JSON at `path` as bars beside it (PNG): per batch and linear layer, cuBLAS, the
    kernel's default launch and its best launch, in µs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    rows = [r for r in result["runs"] if "us" in r]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        layers = list(dict.fromkeys(r["layer"] for r in rows if r["batch"] == batch))
        times = {name: {r["launch"]: r["us"] for r in rows if r["batch"] == batch and r["layer"] == name}
                 for name in layers}
        series = {"cuBLAS and its neighbours": [times[n]["cublas"] for n in layers],
                  "fused, default launch": [times[n].get("default", float("nan")) for n in layers],
                  "fused, best launch": [min(us for launch, us in times[n].items() if launch != "cublas")
                                         for n in layers]}
        for i, (label, values) in enumerate(series.items()):
            ax.bar([x + 0.27 * (i - 1) for x in range(len(layers))], values, width=0.27, label=label)
        ax.set_xticks(range(len(layers)), layers, fontsize=8)
        ax.set_ylabel("µs per call (CUDA graph)")
        ax.set_title(f"batch {batch}, {result['device']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="rat_1p3b,attention_1p3b")
    parser.add_argument("--batches", default="2048,128", help="one per model")
    parser.add_argument("--prompt", type=int, default=3072)
    parser.add_argument("--new", type=int, default=1024)
    parser.add_argument("--prefill-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", default="none", help="as benchmarks/generate.py's --compile")
    parser.add_argument("--set", action="append", default=[], help="config override key=value for every model")
    parser.add_argument("--sweep", action="store_true", help="time the decode kernel's launches instead")
    parser.add_argument("--sweep-linear", action="store_true", help="time the fused decode linears' launches instead")
    parser.add_argument("--read-floor", action="store_true",
                        help="time a read-only kernel over the decode kernel's bytes beside it instead")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "profile_decode.json")
    parser.add_argument("--plot-sweep-linear", type=Path, help="only draw the PNG of an existing --sweep-linear JSON")
    args = parser.parse_args()
    if args.plot_sweep_linear:
        plot_linear_sweep(args.plot_sweep_linear)
        return
    if args.sweep_linear:
        rows = sweep_linear_launch(list(map(int, args.batches.split(","))))
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "runs": rows}, indent=1))
        plot_linear_sweep(args.out)
        return
    if args.sweep or args.read_floor:  # one layer's decode kernel at the first batch, mid-way through the new tokens
        batch = int(args.batches.split(",")[0])
        rows = (read_floor if args.read_floor else sweep_decode_launch)(batch, args.prompt + args.new // 2,
                                                                        args.prompt + args.new)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "batch": batch, "runs": rows},
                                       indent=1))
        return
    models, batches = args.models.split(","), list(map(int, args.batches.split(",")))
    if len(models) != len(batches):
        parser.error(f"--batches needs one batch per model: {len(models)} models, {len(batches)} batches")
    runs = []
    for name, batch in zip(models, batches):
        runs.append(profile_model(name, batch, args))
        print(json.dumps(runs[-1], indent=1), flush=True)
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "prompt": args.prompt, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
