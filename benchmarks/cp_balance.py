"""Per-rank time of RAT's context-parallel mixing (forward + backward) in the contiguous and the
zigzag layout: what the causal imbalance costs, measured rather than counted.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/cp_balance.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/cp_balance.py --seq 16384
    (both write benchmarks/results/cp_balance.json, keeping the other CP size's results)

Every rank builds the same random q, k, v, f of one long sequence, takes its part under each
layout (`ContextLayout.local`) and runs `ContextShard.rat_mixing` and its backward (one thread
per rank: autograd runs CPU backward on the calling thread). A rank's busy time is the CPU time
of that thread minus what it spends inside the layout's collectives (all-gather, reduce-scatter,
point-to-point, timed by wrapping torch.distributed), so neither waiting for a slower rank nor
losing the core to another process on a shared machine counts as work. Per layout and sequence
length the JSON holds every rank's median busy time, busiest / mean, the ratio that counting the
softmax keys predicts, and the median wall time of the step (the busiest rank's, plus waiting;
only meaningful on an otherwise idle machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ratpt.config import load_config
from ratpt.parallel.context_blocks import LAYOUTS, ContextLayout
from ratpt.parallel.context_parallel import ContextShard

TIMED = ("all_gather_into_tensor", "reduce_scatter_tensor", "batch_isend_irecv")


class CollectiveClock:
    """CPU seconds of this thread spent inside the wrapped torch.distributed calls (on CPU they
    return when done)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in TIMED:
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start

        return timed


def inputs(seq_len: int, d_model: int, qk: int) -> list[torch.Tensor]:
    """q, k, v, f of one sequence, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1, seq_len, qk), (1, seq_len, qk), (1, seq_len, d_model), (1, seq_len, d_model)]
    return [torch.randn(shape, generator=g) for shape in shapes]


def step(shard: ContextShard, tensors, gate_bias, cfg) -> None:
    local = [shard.layout.local(t).requires_grad_() for t in tensors]
    y = shard.rat_mixing(*local, gate_bias, cfg.chunk_size, cfg.head_dim, cfg.rope_base)
    y.backward(torch.ones_like(y))


def measure(layout: str, seq_len: int, cfg, repeats: int, clock: CollectiveClock) -> dict:
    rank, size = dist.get_rank(), dist.get_world_size()
    shard = ContextShard(dist.group.WORLD, ContextLayout(layout, rank, size))
    tensors = inputs(seq_len, cfg.d_model, cfg.ngroups * cfg.head_dim)
    gate_bias = torch.zeros(cfg.d_model, requires_grad=True)
    step(shard, tensors, gate_bias, cfg)  # warm-up
    busy, wall = [], []
    for _ in range(repeats):
        dist.barrier()
        clock.seconds = 0.0
        start, cpu_start = time.perf_counter(), time.thread_time()
        step(shard, tensors, gate_bias, cfg)
        elapsed = time.perf_counter() - start
        busy.append(time.thread_time() - cpu_start - clock.seconds)
        times = [None] * size
        dist.all_gather_object(times, elapsed)
        wall.append(max(times))
    per_rank = [None] * size
    dist.all_gather_object(per_rank, statistics.median(busy))
    return {"layout": layout, "seq_len": seq_len, "cp": size, "repeats": repeats, "busy_seconds_per_rank": per_rank,
            "busiest_over_mean": max(per_rank) / statistics.mean(per_rank), "step_seconds": statistics.median(wall),
            "summary_keys_busiest_over_mean": summary_keys_busiest_over_mean(layout, seq_len, size, cfg.chunk_size)}


def summary_keys_busiest_over_mean(layout: str, seq_len: int, cp: int, chunk_size: int) -> float:
    """The same ratio from counting: softmax keys (earlier summaries + own state) summed per rank."""
    keys = [float((ContextLayout(layout, r, cp).positions(seq_len // cp) // chunk_size + 1).sum()) for r in range(cp)]
    return max(keys) / statistics.mean(keys)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/cp_balance.json")
    parser.add_argument("--seq", type=int, nargs="*", default=[16384, 32768])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(None, ["data.streams=[{path: unused}]", f"model.d_model={args.d_model}",
                             f"model.head_dim={args.head_dim}", f"model.chunk_size={args.chunk_size}"]).model
    clock = CollectiveClock()
    results = []
    for seq_len in args.seq:
        for layout in LAYOUTS:
            results.append(measure(layout, seq_len, cfg, args.repeats, clock))
            if dist.get_rank() == 0:
                print(json.dumps(results[-1]), flush=True)
    if dist.get_rank() == 0:
        out = Path(args.out)
        if out.exists():  # keep the other CP sizes' results (one launch per CP size)
            results = [r for r in json.loads(out.read_text())["results"] if r["cp"] != dist.get_world_size()] + results
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "what": "RAT context-parallel mixing (ContextShard.rat_mixing), forward + backward, B 1, CPU gloo, "
                    "one thread per rank; busy = the thread's CPU time minus its CPU time inside collectives",
            "d_model": cfg.d_model, "head_dim": cfg.head_dim, "ngroups": cfg.ngroups, "chunk_size": cfg.chunk_size,
            "threads_per_rank": torch.get_num_threads(), "results": results}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
