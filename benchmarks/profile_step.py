"""Where one training step's time goes, per model: GPU kernels by category (torch.profiler).

The step is benchmarks/train.py's (bf16 autocast, fused AdamW, clipping; optionally compiled
blocks and activation checkpointing). After warmup steps, one step runs under the profiler and
every GPU kernel's time is summed into a category by its name:

  matmul        cuBLAS / CUTLASS GEMMs (projections, FFN, head and their gradients)
  rat_mixing    the Triton kernels of kernels/ (RAT's sequence mixing, forward and backward)
  attention     SDPA kernels (flash, cuDNN, memory-efficient)
  optimizer     clipping norms and the fused AdamW (multi-tensor kernels)
  communication NCCL (none on one GPU)
  data          host-to-device copies
  glue          everything else: norms, gates, activations, residuals, casts, loss, embedding

The step's wall time (timed without the profiler) minus the summed kernel time is the GPU idle
time (launch overhead, host syncs). Matmul and mixing throughput use the per-layer FLOP count
of ratpt.model.flops, to compare with the ceilings (bf16 dense matmul ≈ 670 TFLOP/s measured on
an H200). Writes JSON and the markdown table (stdout and beside the JSON).

    python benchmarks/profile_step.py --out benchmarks/results/profile.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ratpt.model.config import mixer_of_layer
from ratpt.model.flops import ffn_flops_per_token, head_flops_per_token, keys_per_token, projection_flops_per_token
from profiling import CATEGORIES, by_category, category, kernel_times, rat_kernel_names
from train import REPO, build_step, parse_case

def dense_and_mixing_flops(model_cfg, seq_len: int) -> tuple[float, float]:
    """Training FLOPs per token (3 × forward) of the GEMMs, and of the softmax products of the mixers."""
    dense = mixing = 0.0
    for layer in range(model_cfg.n_layers):
        kind = mixer_of_layer(model_cfg, layer)
        dense += projection_flops_per_token(kind, model_cfg) + ffn_flops_per_token(model_cfg)
        mixing += 4.0 * model_cfg.d_model * keys_per_token(kind, model_cfg, seq_len)
    return 3 * (dense + head_flops_per_token(model_cfg)), 3 * mixing


def profile_case(case: str, seq_len: int, warmup: int, rat_names: set[str]) -> dict:
    config, micro_batch, flags = parse_case(case)
    device = torch.device("cuda")
    cfg, step = build_step(config, micro_batch, seq_len, flags, device)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    torch.cuda.synchronize(device)
    step_ms = 1000 * (time.perf_counter() - start)
    per_kernel = kernel_times(step, 1)  # after one more untimed step
    per_category = by_category(per_kernel, rat_names)
    busy = sum(per_category.values())
    tokens = micro_batch * seq_len
    dense, mixing = dense_and_mixing_flops(cfg.model, seq_len)
    mixing_ms = per_category["rat_mixing"] + per_category["attention"]
    top = sorted(per_kernel.items(), key=lambda item: -item[1])[:12]
    return {
        "case": case, "model": config, "micro_batch": micro_batch, "flags": sorted(flags), "seq_len": seq_len,
        "step_ms": step_ms, "gpu_busy_ms": busy, "gpu_idle_ms": max(0.0, step_ms - busy), "ms": per_category,
        "share": {k: v / step_ms for k, v in per_category.items()},
        "matmul_tflops": dense * tokens / (per_category["matmul"] / 1000) / 1e12 if per_category["matmul"] else None,
        "mixing_tflops": mixing * tokens / (mixing_ms / 1000) / 1e12 if mixing_ms else None,
        "top_kernels": [{"name": name[:160], "ms": ms, "category": category(name, rat_names)} for name, ms in top],
    }


def markdown(results: list[dict]) -> str:
    ok = [r for r in results if "ms" in r]
    head = "| | " + " | ".join(f"{r['model']} mb {r['micro_batch']}{' ' + '+'.join(r['flags']) if r['flags'] else ''}"
                                for r in ok) + " |"
    lines = [head, "|---" * (len(ok) + 1) + "|"]
    lines.append("| step (ms) | " + " | ".join(f"{r['step_ms']:.0f}" for r in ok) + " |")
    for cat in CATEGORIES:
        lines.append(f"| {cat} | " + " | ".join(f"{r['ms'][cat]:.0f} ({100 * r['share'][cat]:.0f}%)" for r in ok) + " |")
    lines.append("| GPU idle | " + " | ".join(f"{r['gpu_idle_ms']:.0f} ({100 * r['gpu_idle_ms'] / r['step_ms']:.0f}%)"
                                             for r in ok) + " |")
    for key, label in (("matmul_tflops", "matmul TFLOP/s"), ("mixing_tflops", "mixing TFLOP/s (mask-aware)")):
        lines.append(f"| {label} | " + " | ".join(f"{r[key]:.0f}" if r[key] else "–" for r in ok) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="rat_1p3b:8,attention_1p3b:8,rat_swa_1p3b:8",
                        help="config:micro_batch[:flags], as benchmarks/train.py")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=3600, help="start no case after this many seconds")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "profile.json")
    parser.add_argument("--update", action="store_true", help="keep the cases of --out that this run does not profile")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rat_names = rat_kernel_names()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}
    if args.update and args.out.exists():
        result["results"] = json.loads(args.out.read_text())["results"]
    deadline = time.time() + args.budget_s
    for case in args.cases.split(","):
        if time.time() > deadline:
            row = {"case": case, "skipped": "time budget"}
        else:
            try:
                row = profile_case(case, args.seq_len, args.warmup, rat_names)
            except Exception as error:  # record and go on: one failing case must not lose the others
                row = {"case": case, "error": f"{type(error).__name__}: {str(error)[:400]}"}
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        if "skipped" in row and any(r["case"] == row["case"] for r in result["results"]):
            continue  # a case not run keeps its earlier profile
        result["results"] = [r for r in result["results"] if r["case"] != row["case"]] + [row]
        result["markdown"] = markdown(result["results"])
        args.out.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(result["markdown"])
    print(result["markdown"])


if __name__ == "__main__":
    main()
