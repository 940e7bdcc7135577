"""Whole-model training throughput on one GPU: RAT, attention and the hybrid, side by side.

Each model from configs/ runs a few optimizer steps (bf16 autocast over fp32 master weights,
fused AdamW, clipping — the trainer's single-process path) on random tokens at each micro-batch
size, with and without activation checkpointing, in one process so the ratios are comparable.
MFU uses the model's own FLOP count (ratpt.model.flops, mask-aware) over the device's dense bf16
peak. Writes JSON (and a PNG with --plot).

    python benchmarks/train.py --out benchmarks/results/train.json
    python benchmarks/train.py --plot benchmarks/results/train.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ratpt.config import load_config
from ratpt.model import build_model
from ratpt.model.flops import training_flops_per_token
from ratpt.train.engine import sum_cross_entropy
from ratpt.train.metrics import device_peak_tflops
from ratpt.train.optim import build_optimizer
from ratpt.train.trainer import apply_activation_checkpointing

REPO = Path(__file__).resolve().parents[1]


def run_case(config: str, micro_batch: int, seq_len: int, checkpointing: bool, steps: int, warmup: int) -> dict:
    cfg = load_config(REPO / "configs" / f"{config}.yaml")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    if checkpointing:
        apply_activation_checkpointing(model)
    optimizer, _ = build_optimizer(model, cfg.optimizer, cfg.schedule, total_steps=1000)
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1), device=device)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        loss = sum_cross_entropy(model, batch, device, "bf16") / batch["labels"].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = micro_batch * seq_len / seconds
    flops = training_flops_per_token(cfg.model, seq_len)
    peak = device_peak_tflops(device, 0.0)
    return {
        "model": config, "micro_batch": micro_batch, "seq_len": seq_len, "activation_checkpointing": checkpointing,
        "step_ms": 1000 * seconds, "tokens_per_s": tokens_per_s, "tflops": tokens_per_s * flops / 1e12,
        "mfu": tokens_per_s * flops / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30, "final_loss": float(loss),
    }


def benchmark(args: argparse.Namespace) -> dict:
    results = []
    for config in args.models.split(","):
        for checkpointing in (False, True):
            for micro_batch in (int(m) for m in args.micro_batches.split(",")):
                try:
                    row = run_case(config, micro_batch, args.seq_len, checkpointing, args.steps, args.warmup)
                except torch.OutOfMemoryError:
                    row = {"model": config, "micro_batch": micro_batch, "activation_checkpointing": checkpointing,
                           "oom": True}
                torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                results.append(row)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.loads(path.read_text())["results"] if not r.get("oom")]
    labels = [f"{r['model']}\nmb {r['micro_batch']}{' ckpt' if r['activation_checkpointing'] else ''}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=7)
    ax.set_ylabel("training tokens/s (one GPU)")
    ax.set_title("1.3B models, seq 4096, bf16")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rat_1p3b,attention_1p3b,rat_swa_1p3b")
    parser.add_argument("--micro-batches", default="4,8")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train.json")
    parser.add_argument("--plot", type=Path, help="only plot an existing JSON file")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(benchmark(args), indent=1))
    plot(args.out)


if __name__ == "__main__":
    main()
