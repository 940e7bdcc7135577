"""Generation throughput (benchmarks/RESULTS.md#generation): prompt 3072 + 1024 new tokens, RAT vs attention vs hybrid.

For each model (bf16 weights, random init: speed does not depend on the values) and each batch
size, doubling until the GPU runs out of memory:
  - prefill: `model.prefill` of the prompts into a cache preallocated for prompt + new tokens;
    timed on `--prefill-batch` sequences (compute-bound, so it scales with the batch), whose
    cache is then repeated to the batch (ModelCache.repeat_interleave) — prefilling thousands
    of RAT prompts would cost minutes of device time for no new information;
  - decode: greedy, one token per sequence per step, `new - 1` steps (the first new token comes
    from the prefill), replayed as one CUDA graph per step (ratpt.decoder.GraphedDecodeStep);
    the warmup and capture steps are not timed;
  - generated tokens/s = batch / decode time per step; end-to-end tokens/s also counts the
    prefill of the whole batch (the per-sequence prefill time × batch); peak memory;
  - roofline: the bytes one decode step must read (every weight once, and the cache slots the
    step attends to at the timed steps' middle position) over the copy bandwidth measured on
    the same device at the start of the run: the floor of a step, and the step's share of it.
`--compile MODE` runs each block's decode through torch.compile (ratpt.decoder.compile_decode;
"default" is torch.compile's default mode) inside the same CUDA graph; `--set model.kernels=triton`
takes the fused decode linears (ratpt.ops.decode_linear) instead of cuBLAS. On Hopper the decode kernels launch
as programmatic dependents; `--no-dependent-launch` launches them plainly, for the comparison.
The RAT/attention ratio compares each model's best decode tokens/s (its best batch).
On CPU (smoke test) the decode runs eagerly.

    python benchmarks/generate.py --out benchmarks/results/generate.json        # one GPU
    python benchmarks/generate.py --models rat_1p3b --min-batch 1024 --update   # re-measure some batches
    python benchmarks/generate.py --plot benchmarks/results/generate.json       # PNG beside it
    python benchmarks/generate.py --models rat_1p3b,attention_1p3b --batches 1,64 --compile default
    python benchmarks/generate.py --models rat_1p3b,attention_1p3b --batches 1,64 --set model.kernels=triton
    python benchmarks/generate.py --models rat_1p3b --batches 1,64 --set model.kernels=triton --no-dependent-launch
    python benchmarks/generate.py --models tiny --prompt 16 --new 8 --batches 1,2 --device cpu
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from ratpt.config import load_config
from ratpt.decoder import GraphedDecodeStep, compile_decode
from ratpt.model import build_model
from ratpt.model.config import mixer_of_layer
from ratpt_kernels import common as kernel_common

REPO = Path(__file__).resolve().parents[1]
UNTIMED_STEPS = 3  # eager warmup steps + the capture step of GraphedDecodeStep


class Clock:
    """Wall time of device work: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms_since(self, start) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return 1000 * (time.perf_counter() - start)


def cache_bytes_read(model_cfg, batch: int, position: int, itemsize: int) -> float:
    """Bytes of cache one decode step at `position` reads: per layer, every slot it attends to."""
    per_layer = []
    for mixer in map(partial(mixer_of_layer, model_cfg), range(model_cfg.n_layers)):
        if mixer == "rat":
            slots = position // model_cfg.chunk_size
        elif mixer == "attention":  # keys 0..position, its own included
            slots = position + 1
        elif mixer == "swa":  # itself and `window` earlier tokens
            slots = min(position, model_cfg.window) + 1
        else:  # an RNN's state is not a cache of slots
            slots = 0
        per_layer.append(2 * slots * model_cfg.d_model * itemsize)
    return batch * sum(per_layer)


def copy_bandwidth(device: torch.device, gib: int = 2) -> float | None:
    """Bytes per second a large device-to-device copy moves (read + written): the roofline's bandwidth."""
    if device.type != "cuda":
        return None
    src = torch.empty(gib * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    clock, repeats = Clock(device), 10
    start = clock.start()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * src.numel() * repeats / (clock.ms_since(start) / 1000)


@torch.inference_mode()
def run_batch(model, batch: int, prompt: int, new: int, prefill_batch: int, device: torch.device,
              bandwidth: float | None = None) -> dict:
    clock = Clock(device)
    vocab = model.cfg.vocab_size
    n_prefill = min(batch, prefill_batch)
    if batch % n_prefill:
        raise ValueError(f"batch {batch} must be a multiple of the prefill batch {n_prefill}")
    prompts = torch.randint(0, vocab, (n_prefill, prompt), device=device)
    start = clock.start()
    logits, cache = model.prefill(prompts, capacity=prompt + new)
    prefill_ms = clock.ms_since(start)
    if batch > n_prefill:
        cache = cache.repeat_interleave(batch // n_prefill)
        logits = logits.repeat_interleave(batch // n_prefill, 0)
    decode = GraphedDecodeStep(model, cache) if device.type == "cuda" else (lambda t: model.decode_step(t, cache))
    tokens = torch.empty(batch, new, dtype=torch.long, device=device)
    tokens[:, 0] = logits.argmax(-1)
    untimed = min(UNTIMED_STEPS, new - 2)
    for step in range(1, new):
        if step == untimed + 1:
            start = clock.start()
        tokens[:, step] = decode(tokens[:, step - 1]).argmax(-1)
    timed_steps = new - 1 - untimed
    decode_ms = clock.ms_since(start) / timed_steps
    prefill_per_seq = prefill_ms / n_prefill
    total_s = (prefill_per_seq * batch + decode_ms * (new - 1)) / 1000
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    position = prompt + untimed + 1 + timed_steps // 2  # the middle timed step's
    step_bytes = weights + cache_bytes_read(model.cfg, batch, position, next(model.parameters()).element_size())
    roofline_ms = step_bytes / bandwidth * 1000 if bandwidth else None
    return {
        "batch": batch, "prefill_batch": n_prefill, "prefill_ms": prefill_ms,
        "prefill_ms_per_sequence": prefill_per_seq, "decode_ms_per_step": decode_ms, "timed_steps": timed_steps,
        "decode_tokens_per_s": batch / decode_ms * 1000, "end_to_end_tokens_per_s": batch * new / total_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "cuda_graph": device.type == "cuda", "gb_read_per_step": step_bytes / 1e9, "roofline_ms": roofline_ms,
        "of_roofline": roofline_ms / decode_ms if roofline_ms else None,
    }


def benchmark_model(name: str, args: argparse.Namespace, device: torch.device, save) -> dict:
    """Every batch size of one model, doubling from --min-batch until out of memory, --max-batch or
    the model's time budget; `save()` after each batch so a killed run keeps what it measured."""
    deadline = time.time() + args.budget_s
    cfg = load_config(REPO / "configs" / f"{name}.yaml", args.set)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg.model).to(device, dtype).eval()
    if args.compile != "none":
        compile_decode(model, None if args.compile == "default" else args.compile)
    with torch.inference_mode():  # kernels compiled, cuBLAS and SDPA set up for the prompt's shapes, untimed
        model.prefill(torch.zeros(1, args.prompt, dtype=torch.long, device=device))
    result = {"model": name, "mixers": list(cfg.model.mixers), "chunk_size": cfg.model.chunk_size,
              "window": cfg.model.window, "kernels": cfg.model.kernels, "compile": args.compile, "largest_batch": None,
              "best": None, "batches": []}
    batches = iter(map(int, args.batches.split(","))) if args.batches else None
    batch = next(batches) if batches else args.min_batch
    while batch is not None and batch <= args.max_batch:
        if time.time() > deadline:
            result["batches"].append({"batch": batch, "skipped": "time budget"})
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row = run_batch(model, batch, args.prompt, args.new, args.prefill_batch, device, args.bandwidth)
        except torch.OutOfMemoryError:
            row = {"batch": batch, "oom": True}
        print(name, json.dumps(row), flush=True)
        result["batches"].append(row)
        fits = [r for r in result["batches"] if "decode_tokens_per_s" in r]
        result["largest_batch"] = max((r["batch"] for r in fits), default=None)
        result["best"] = max(fits, key=lambda r: r["decode_tokens_per_s"], default=None)
        save(result)
        if row.get("oom"):
            break
        batch = next(batches, None) if batches else 2 * batch
    return result


def ratios(models: list[dict]) -> dict:
    """Best decode and end-to-end tokens/s of every model over the attention model's."""
    attention = next((m for m in models if m.get("mixers") == ["attention"] and m.get("best")), None)
    if attention is None:
        return {}
    return {m["model"]: {key: m["best"][key] / attention["best"][key]
                         for key in ("decode_tokens_per_s", "end_to_end_tokens_per_s")}
            for m in models if m.get("best")}


def merge_batches(old: dict | None, new: dict) -> dict:
    """`new` (one model's run) with the batch rows of `old` it did not measure (--update)."""
    if not old or "batches" not in old or "batches" not in new:
        return new
    rows = {r["batch"]: r for r in old["batches"]}
    rows |= {r["batch"]: r for r in new["batches"] if "skipped" not in r or r["batch"] not in rows}
    merged = dict(new, batches=[rows[b] for b in sorted(rows)])
    fits = [r for r in merged["batches"] if "decode_tokens_per_s" in r]
    merged["largest_batch"] = max((r["batch"] for r in fits), default=None)
    merged["best"] = max(fits, key=lambda r: r["decode_tokens_per_s"], default=None)
    return merged


def benchmark(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    args.bandwidth = copy_bandwidth(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "prompt": args.prompt, "new_tokens": args.new,
              "copy_tb_per_s": args.bandwidth / 1e12 if args.bandwidth else None,
              "prefill_batch": args.prefill_batch, "dependent_launches": kernel_common.dependent_launch(device),
              "models": [], "ratio_to_attention": {}}
    earlier = {}
    if args.update and args.out.exists():
        result["models"] = json.loads(args.out.read_text())["models"]
        earlier = {m["model"]: m for m in result["models"]}

    def save(model_result: dict) -> None:
        model_result = merge_batches(earlier.get(model_result["model"]), model_result)
        models = [m for m in result["models"] if m["model"] != model_result["model"]] + [model_result]
        result["models"] = models
        result["ratio_to_attention"] = ratios(models)
        args.out.write_text(json.dumps(result, indent=1))

    for name in args.models.split(","):
        try:
            save(benchmark_model(name, args, device, save))
        except Exception as error:  # record and go on: one failing model must not lose the others
            save({"model": name, "error": f"{type(error).__name__}: {str(error)[:400]}"})
            print(name, result["models"][-1]["error"], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for model in result["models"]:
        points = [(r["batch"], r["decode_tokens_per_s"]) for r in model.get("batches", []) if "decode_tokens_per_s" in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=model["model"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("generated tokens/s (decode)")
    ax.set_title(f"prompt {result['prompt']} + {result['new_tokens']} new tokens, {result['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rat_1p3b,attention_1p3b,rat_swa_1p3b", help="config names")
    parser.add_argument("--set", action="append", default=[], help="config override key=value for every model")
    parser.add_argument("--prompt", type=int, default=3072)
    parser.add_argument("--new", type=int, default=1024)
    parser.add_argument("--min-batch", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8192)
    parser.add_argument("--batches", help="comma-separated batch sizes to measure instead of doubling from --min-batch")
    parser.add_argument("--compile", default="none",
                        help="torch.compile mode of each block's decode: none, default, max-autotune-no-cudagraphs")
    parser.add_argument("--no-dependent-launch", action="store_true",
                        help="launch the decode kernels plainly, not as programmatic dependents (Hopper), for the A/B")
    parser.add_argument("--prefill-batch", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=300, help="per model: start no batch after this many seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "generate.json")
    parser.add_argument("--update", action="store_true",
                        help="keep the other models and batch sizes already in --out (re-measure some)")
    parser.add_argument("--plot", type=Path, help="only plot an existing JSON file")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
        return
    kernel_common.DEPENDENT_LAUNCHES = not args.no_dependent_launch
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps(benchmark(args)["ratio_to_attention"], indent=1))


if __name__ == "__main__":
    main()
