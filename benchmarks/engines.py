"""Training throughput of the engines at equal batch: one process's, megatron-core's, DeepSpeed ZeRO.

One engine per launch (each owns its process groups); every launch appends one JSON line. The
step is the trainer's (forward_backward / clip / set_lr / step of the engine `ratpt train` builds,
its model prepared as `ratpt train` prepares it: train.compile, activation checkpointing) on random
tokens, so the numbers compare the engines and nothing else. `--engine megatron` is megatron-core's
engine even in one process (a one-rank group), where `ratpt train` would run the local engine,
so one GPU measures both.

    python benchmarks/engines.py --engine local        (one process; --set train.compile=false: eager)
    torchrun --standalone --nproc-per-node 2 benchmarks/engines.py --engine megatron
    torchrun --standalone --nproc-per-node 2 benchmarks/engines.py --engine deepspeed --zero-stage 1
    torchrun --standalone --nproc-per-node 2 benchmarks/engines.py --engine deepspeed --zero-stage 3
    (--profile: rank 0's kernel time of one more step by category, communication included)
    (options: --config rat_1p3b --global-batch 32 --micro-batch 4 --seq-len 4096 --steps 10 --warmup 3
     --out benchmarks/results/engines.jsonl; --set key=value for any other ratpt config key)

The same harness measures long context, e.g. one 131072-token sequence per step over CP = 2:
    torchrun --standalone --nproc-per-node 2 benchmarks/engines.py --engine megatron --global-batch 1 \
        --micro-batch 1 --seq-len 131072 --set parallel.context=2 --set train.activation_checkpointing=true
A step that runs out of GPU memory (one process) is recorded as "does not fit", with the memory
reached, instead of ending the script: memory settings are compared on what fits and what does not.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ratpt.config import load_config, micro_batches_per_step
from ratpt.engines import LocalEngine
from ratpt.engines.compile import prepare_model
from ratpt.model import build_model
from ratpt.model.flops import training_flops_per_token
from ratpt.parallel.process_group import init_distributed
from ratpt.train.metrics import device_peak_tflops

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["local", "megatron", "deepspeed"], required=True,
                        help="local: the one-process engine; megatron: megatron-core's, in a group of one on one process")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--config", default="rat_1p3b")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="extra ratpt config overrides, key=value")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "engines.jsonl"))
    parser.add_argument("--profile", action="store_true",
                        help="also one step under torch.profiler: rank 0's GPU kernel time by category (CUDA only)")
    args = parser.parse_args()
    if args.profile and not torch.cuda.is_available():
        parser.error("--profile times GPU kernels: it needs CUDA")

    cfg = load_config(REPO / "configs" / f"{args.config}.yaml", [
        f"train.engine={'deepspeed' if args.engine == 'deepspeed' else 'megatron'}",
        f"deepspeed.zero_stage={args.zero_stage}",
        f"train.global_batch={args.global_batch}", f"train.micro_batch={args.micro_batch}",
        f"data.seq_len={args.seq_len}", *args.set])
    ctx = init_distributed(cfg.train.device, group_of_one=args.engine == "megatron")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(ctx.device)
    backend = prepare_model(model, cfg, ctx.device)  # as build_engine does, whatever the number of processes
    engine = engine_class(args.engine)(cfg, ctx, model, backend)
    accum = micro_batches_per_step(cfg.train, engine.dp_size)
    g = torch.Generator().manual_seed(engine.dp_rank)  # CP ranks of one DP rank read the same sequences
    tokens = torch.randint(0, cfg.model.vocab_size, (accum, cfg.train.micro_batch, cfg.data.seq_len + 1), generator=g)
    batches = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in tokens]

    def step() -> None:
        engine.forward_backward(batches)
        engine.clip_grad_norm(cfg.optimizer.grad_clip)
        engine.set_lr(cfg.optimizer.lr)
        engine.step()

    result = {
        "engine": f"deepspeed-zero{args.zero_stage}" if args.engine == "deepspeed" else args.engine,
        "compile": backend, "device": torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(), "commit": os.environ.get("RATPT_COMMIT"),
        "config": args.config, "processes": ctx.world_size, "global_batch": cfg.train.global_batch,
        "micro_batch": cfg.train.micro_batch, "seq_len": cfg.data.seq_len, "overrides": args.set,
    }
    try:
        seconds = timed_steps(step, args.warmup, args.steps, ctx.device)
    except torch.OutOfMemoryError as err:
        if ctx.world_size > 1:
            raise  # the other ranks wait in a collective: only one process can note it and go on
        result |= {"result": "does not fit", "max_memory_gib": round(peak_gib(ctx.device), 2),
                   "error": ". ".join(str(err).split(". ")[:2])}  # "CUDA out of memory. Tried to allocate ..."
    else:
        tokens_per_s = cfg.train.global_batch * cfg.data.seq_len / seconds
        peak = device_peak_tflops(ctx.device, cfg.logging.peak_tflops)
        flops = training_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_s
        result |= {"step_s": round(seconds, 4), "tokens_per_s": round(tokens_per_s),
                   "tokens_per_s_per_gpu": round(tokens_per_s / ctx.world_size),
                   "mfu": round(flops / (peak * 1e12 * ctx.world_size), 4) if peak else None,
                   "max_memory_gib": round(peak_gib(ctx.device), 2)}
        if args.profile:
            result["profile_ms"] = step_profile(step)
    if ctx.is_main:
        print(json.dumps(result))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(result) + "\n")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def timed_steps(step, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step after `warmup` untimed steps (compilation, allocator warm-up)."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def engine_class(name: str):
    if name == "local":
        return LocalEngine
    if name == "megatron":
        from ratpt.engines.megatron_engine import MegatronEngine

        return MegatronEngine
    from ratpt.engines.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine


def step_profile(step) -> dict[str, float]:
    """This rank's GPU kernel time of one step (after one more) by profile_step.py's categories. NCCL kernels run on
    their own streams, so with overlap the categories sum to more than the step's time; what
    `communication` adds to the step is at most the difference."""
    from profiling import by_category, kernel_times, rat_kernel_names

    categories = by_category(kernel_times(step, 1), rat_kernel_names())
    return {name: round(ms, 1) for name, ms in categories.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
