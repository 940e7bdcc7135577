"""Whole-model training throughput on one GPU: RAT, attention and the hybrid, side by side.

Each model from configs/ runs a few optimizer steps (bf16 autocast over fp32 master weights,
fused AdamW, clipping — the trainer's single-process path) on random tokens, for each case
"config:micro_batch:flags", flags a "+"-joined subset of
  ckpt     activation checkpointing of every block (ratpt.train.trainer's)
  compile  torch.compile of every block's forward (static shapes), as train.compile
           does: identical blocks share one compiled graph, so compiling costs one block, not 24
  logits   the head's logits, then the loss over them (compiled with `compile`), instead of the
           fused chunked head + loss (train.fused_loss, the default)
  fp8      FP8 GEMMs in the blocks' projections, tensorwise scaling (train.fp8=tensorwise: torchao)
  fp8row   the same with rowwise scaling (train.fp8=rowwise)
  tune     with `compile`: inductor's coordinate-descent tuning of the blocks' kernels (train.compile_tuning)
all in one process so the ratios are comparable. --accumulation N runs N micro-batches per
optimizer step, as the trainer does when train.global_batch exceeds the micro-batch. MFU uses the
model's own FLOP count (ratpt.model.flops, mask-aware) over the device's dense bf16 peak, and over its
dense FP8 peak (`mfu_fp8_peak`, the bound of an FP8 case whose every GEMM were FP8). Writes
JSON after every case (the PNG with --plot, where matplotlib is). The default cases are every
model × flags × --micro-batches: once a micro-batch runs out of memory, the larger ones of the same
model and flags are skipped, so each row set ends at the largest micro-batch that fits.

    python benchmarks/train.py --out benchmarks/results/train.json
    python benchmarks/train.py --cases rat_1p3b:8:compile,attention_1p3b:8:compile
    python benchmarks/train.py --cases rat_1p3b:8:compile,rat_1p3b:8:compile+fp8,rat_1p3b:8:compile+fp8row
    python benchmarks/train.py --cases rat_1p3b:12:compile+fp8,rat_1p3b:12:compile+fp8+tune
    python benchmarks/train.py --cases rat_1p3b:8:compile --accumulation 8 --update
    python benchmarks/train.py --plot benchmarks/results/train.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ratpt.config import load_config
from ratpt.engines.compile import apply_activation_checkpointing, apply_compile
from ratpt.engines.loss import sum_cross_entropy
from ratpt.engines.optim import parameter_groups
from ratpt.model import build_model
from ratpt.model.flops import training_flops_per_token
from ratpt.train.metrics import device_peak_tflops

REPO = Path(__file__).resolve().parents[1]
FLAGS = ("ckpt", "compile", "logits", "fp8", "fp8row", "tune")
FP8_RECIPES = {"fp8": "tensorwise", "fp8row": "rowwise"}  # flag -> train.fp8


def parse_case(case: str) -> tuple[str, int, set[str]]:
    """"rat_1p3b:8:compile+ckpt" -> ("rat_1p3b", 8, {"compile", "ckpt"})."""
    config, micro_batch, *flags = case.split(":")
    flags = set(flags[0].split("+")) - {""} if flags else set()
    if flags - set(FLAGS):
        raise ValueError(f"unknown flags {flags - set(FLAGS)} in {case!r}; choose from {FLAGS}")
    if len(flags & set(FP8_RECIPES)) > 1:
        raise ValueError(f"{case!r}: fp8 and fp8row are two recipes of one option; choose one")
    if "tune" in flags and "compile" not in flags:
        raise ValueError(f"{case!r}: tune tunes the compiled kernels; add compile")
    return config, int(micro_batch), flags


def fp8_of(flags: set[str]) -> str:
    """train.fp8 of a case's flags: off, tensorwise or rowwise."""
    return next((FP8_RECIPES[flag] for flag in flags if flag in FP8_RECIPES), "off")


def build_step(config: str, micro_batch: int, seq_len: int, flags: set[str], device: torch.device,
               accumulation: int = 1):
    """The model config and one training step (`accumulation` micro-batches of forward and backward,
    then clip and AdamW) on random tokens."""
    cfg = load_config(REPO / "configs" / f"{config}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    cfg.train.fp8, cfg.train.micro_batch, cfg.data.seq_len = fp8_of(flags), micro_batch, seq_len
    if cfg.train.fp8 != "off":  # first, as prepare_model: checkpointing and compile then see the FP8 modules
        from ratpt.engines.fp8 import apply_fp8  # needs torchao, which only FP8 cases need

        apply_fp8(model, cfg, device)
    if "ckpt" in flags:
        apply_activation_checkpointing(model)
    if "compile" in flags:
        apply_compile(model, tuning="tune" in flags)
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  fused=True)
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1), device=device)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def step() -> torch.Tensor:
        for _ in range(accumulation):
            loss = sum_cross_entropy(model, batch, device, "bf16", "inductor" if "compile" in flags else None,
                                     "logits" not in flags)
            loss = loss / batch["labels"].numel()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return cfg, step


def case_fields(config: str, micro_batch: int, flags: set[str], accumulation: int) -> dict:
    """What a case is, as its result row names it (also the row of a case skipped or out of memory)."""
    return {"model": config, "micro_batch": micro_batch, "activation_checkpointing": "ckpt" in flags,
            "compile": "compile" in flags, "compile_tuning": "tune" in flags, "fused_loss": "logits" not in flags,
            "fp8": fp8_of(flags), "accumulation": accumulation}


def run_case(case: str, seq_len: int, steps: int, warmup: int, accumulation: int = 1) -> dict:
    config, micro_batch, flags = parse_case(case)
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    cfg, step = build_step(config, micro_batch, seq_len, flags, device, accumulation)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - started
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = accumulation * micro_batch * seq_len / seconds
    flops = training_flops_per_token(cfg.model, seq_len)
    peak, fp8_peak = device_peak_tflops(device, 0.0), device_peak_tflops(device, 0.0, fp8=True)
    return {
        **case_fields(config, micro_batch, flags, accumulation), "seq_len": seq_len,
        "step_ms": 1000 * seconds, "tokens_per_s": tokens_per_s,
        "tflops": tokens_per_s * flops / 1e12, "mfu": tokens_per_s * flops / (peak * 1e12) if peak else None,
        "mfu_fp8_peak": tokens_per_s * flops / (fp8_peak * 1e12) if fp8_peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30, "final_loss": float(loss),
        "build_and_warmup_s": warmup_s,
    }


def default_cases(models: str, micro_batches: str) -> list[str]:
    return [f"{model}:{mb}:{flags}" for model in models.split(",") for flags in ("", "ckpt", "compile", "compile+ckpt")
            for mb in micro_batches.split(",")]


def row_key(row: dict) -> tuple:
    return (row["model"], row["micro_batch"], row["activation_checkpointing"], row.get("compile", False),
            row.get("fused_loss", False), row.get("accumulation", 1),  # rows before the fused loss: logits
            row.get("fp8", "off"), row.get("compile_tuning", False))


def benchmark(args: argparse.Namespace) -> dict:
    cases = args.cases.split(",") if args.cases else default_cases(args.models, args.micro_batches)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}
    if args.update and args.out.exists():
        result["results"] = json.loads(args.out.read_text())["results"]
    deadline = time.time() + args.budget_s
    torch._dynamo.config.cache_size_limit = 64  # one entry per model kind and micro-batch in this process
    out_of_memory: dict[tuple, int] = {}  # (model, flags) -> the smallest micro-batch that ran out of memory
    for case in cases:
        config, micro_batch, flags = parse_case(case)
        row = case_fields(config, micro_batch, flags, args.accumulation)
        too_large = smaller_out_of_memory(out_of_memory, config, flags, micro_batch)
        if time.time() > deadline:
            row["skipped"] = "time budget"
        elif too_large:
            row["skipped"] = f"micro-batch {too_large} ran out of memory"
        else:
            try:
                row = run_case(case, args.seq_len, args.steps, args.warmup, args.accumulation)
            except torch.OutOfMemoryError:
                row["oom"] = True
                out_of_memory[(config, frozenset(flags))] = micro_batch
            except Exception as error:  # record and go on: one failing case must not lose the others
                row["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        row["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        if "skipped" in row and any(row_key(r) == row_key(row) for r in result["results"]):
            continue  # a case not run keeps its earlier row
        result["results"] = [r for r in result["results"] if row_key(r) != row_key(row)] + [row]
        args.out.write_text(json.dumps(result, indent=1))
    return result


def smaller_out_of_memory(out_of_memory: dict[tuple, int], config: str, flags: set[str], micro_batch: int) -> int | None:
    """A micro-batch no larger than this one that already ran out of memory with the same model and flags."""
    smallest = out_of_memory.get((config, frozenset(flags)))
    return smallest if smallest is not None and smallest <= micro_batch else None


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.loads(path.read_text())["results"] if "tokens_per_s" in r]
    labels = [f"{r['model']}\nmb {r['micro_batch']}{' ckpt' if r['activation_checkpointing'] else ''}"
              f"{' compile' if r.get('compile') else ''}{' tuned' if r.get('compile_tuning') else ''}"
              f"{'' if r.get('fused_loss') else ' logits'}"
              f"{' fp8 ' + r['fp8'] if r.get('fp8', 'off') != 'off' else ''}"
              f"{' acc ' + str(r['accumulation']) if r.get('accumulation', 1) > 1 else ''}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=7)
    ax.set_ylabel("training tokens/s (one GPU)")
    ax.set_title("1.3B models, seq 4096, bf16 (FP8 GEMMs where marked)")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rat_1p3b,attention_1p3b,rat_swa_1p3b")
    parser.add_argument("--micro-batches", default="4,8,12,16,24,32")
    parser.add_argument("--cases", help="config:micro_batch[:flags] list (default: every model x micro-batch x flags)")
    parser.add_argument("--budget-s", type=float, default=3600, help="start no case after this many seconds")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per optimizer step (the 1.3B recipe's 512-sequence batch is 64 at 8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train.json")
    parser.add_argument("--update", action="store_true", help="keep the rows of --out that this run does not measure")
    parser.add_argument("--plot", type=Path, help="only plot an existing JSON file")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    benchmark(args)


if __name__ == "__main__":
    main()
