"""Bytes each parallel axis communicates in one training step, measured by counting every
collective megatron-core and ratpt issue (not derived from formulas).

    torchrun --standalone --nproc-per-node 2 benchmarks/comm_volume.py --out benchmarks/results/comm_volume.json
    (on GPUs, NCCL: --device cuda --cases rat:4096 attention:4096 rat:102400 attention:102400)

Runs one step (forward, backward, grad reduction, optimizer step with its parameter all-gather)
of each (mixer, sequence length) in each 2-rank-or-more layout (DP, CP, TP, PP) on a small model, and sums, per process
group (tp / cp / dp / dp×cp / pp / world), the bytes of the tensors handed to each collective on
rank 0: the tensor of all_reduce, the gathered output of all_gather, the per-rank output shard of
reduce_scatter (the first argument; megatron and ratpt pass (output, input)), the tensors of
point-to-point send/recv. The model is small (d_model, layers below) so that it runs on
CPU; the volumes scale exactly with d_model × layers for the per-token tensors (CP) and with the
parameter count for DP, and the JSON records the shapes they were measured at.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

COUNTED = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "_reduce_scatter_base",
           "_all_gather_base", "all_gather", "broadcast", "isend", "irecv", "send", "recv")


class CommCounter:
    """Wraps torch.distributed's collectives; bytes per group name while `active`."""

    def __init__(self, group_names) -> None:
        self.group_names = group_names
        self.bytes = defaultdict(int)
        self.by_op = defaultdict(int)
        self.active = False
        self._originals = {}
        # megatron's gradient buffers and TP/SP mappings bind their collectives at import: import
        # first, count those too
        from megatron.core.distributed import param_and_grad_buffer as buffers
        from megatron.core.tensor_parallel import mappings

        for name in COUNTED:
            if hasattr(dist, name):
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._originals[name]))
        buffers.dist_all_gather_func = self._wrap("all_gather_into_tensor", buffers.dist_all_gather_func)
        buffers.dist_reduce_scatter_func = self._wrap("reduce_scatter_tensor", buffers.dist_reduce_scatter_func)
        mappings.dist_all_gather_func = self._wrap("all_gather_into_tensor", mappings.dist_all_gather_func)
        mappings.dist_reduce_scatter_func = self._wrap("reduce_scatter_tensor", mappings.dist_reduce_scatter_func)

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.active:
                tensor = _payload(name, args, kwargs)
                # every counted call takes the group third: (tensor(s), op/src/dst/input, group)
                group = kwargs.get("group", args[2] if len(args) > 2 else None)
                self.bytes[self.group_names(group)] += tensor
                self.by_op[f"{self.group_names(group)}:{name}"] += tensor
            return fn(*args, **kwargs)

        return counted


def _payload(name: str, args, kwargs) -> int:
    def size(t):
        if isinstance(t, torch.Tensor):
            return t.numel() * t.element_size()
        if isinstance(t, (list, tuple)):
            return sum(size(x) for x in t)
        return 0

    if name in ("all_gather_into_tensor", "_all_gather_base", "all_gather"):
        return size(args[0])  # the gathered output: what every rank receives (own part included)
    return size(args[0] if args else kwargs.get("tensor"))


def group_namer():
    from megatron.core import parallel_state as ps

    groups = {}
    for name, get in (("tp", ps.get_tensor_model_parallel_group), ("pp", ps.get_pipeline_model_parallel_group),
                      ("cp", ps.get_context_parallel_group), ("dp", ps.get_data_parallel_group)):
        groups[get()] = name
    groups[ps.get_data_parallel_group(with_context_parallel=True)] = "dp" if ps.get_context_parallel_world_size() == 1 \
        else "dp×cp"

    def name_of(group):
        if group is None:
            return "world"
        return groups.get(group, "other")

    return name_of


def measure(mixer: str, seq_len: int, layout: dict, d_model: int, n_layers: int, vocab: int, device: str) -> dict:
    from ratpt.config import load_config
    from ratpt.model import build_model
    from ratpt.parallel.process_group import init_distributed
    from ratpt.engines.megatron_engine import MegatronEngine
    from ratpt.parallel.mesh import destroy_mesh

    ctx = init_distributed(device)
    world = dist.get_world_size()
    cp = layout.get("context", 1)
    dp = world // (cp * layout.get("tensor", 1) * layout.get("pipeline", 1))
    cfg = load_config(None, [
        f"model.vocab_size={vocab}", f"model.d_model={d_model}", "model.head_dim=64", "model.ngroups=2",
        f"model.n_layers={n_layers}", "model.chunk_size=16", "model.window=1024", f"model.mixers=[{mixer}]",
        "model.kernels=torch", f"data.seq_len={seq_len}", f"train.global_batch={dp}", "train.micro_batch=1",
        "train.precision=fp32", "data.streams=[{path: unused}]",
        *(f"parallel.{axis}={size}" for axis, size in layout.items()),
    ])
    torch.manual_seed(0)
    engine = MegatronEngine(cfg, ctx, build_model(cfg.model).to(ctx.device))
    counter = COUNTER
    counter.group_names = group_namer()
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seq_len + 1))
    batch = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}]
    counter.bytes.clear()
    counter.by_op.clear()
    counter.active = True
    start = time.perf_counter()
    engine.forward_backward(batch)
    engine.clip_grad_norm(1.0)
    engine.step()
    counter.active = False
    seconds = time.perf_counter() - start
    result = {"mixer": mixer, "seq_len": seq_len, "world": world, "layout": layout, "dp": dp, "cp": cp,
              "device": ctx.device.type, "vocab_size": vocab, "d_model": d_model,
              "n_layers": n_layers, "parameters": sum(p.numel() for p in engine.model.parameters()),
              "bytes_per_step_rank0": dict(counter.bytes), "bytes_by_collective": dict(counter.by_op), "step_seconds": round(seconds, 2)}
    destroy_mesh()
    return result


COUNTER = CommCounter(lambda g: "world")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/comm_volume.json")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=["rat:4096", "attention:4096"])  # 100K: GPU only
    parser.add_argument("--layouts", nargs="*", default=["data", "context", "tensor", "pipeline"],
                        help="parallel axes, each measured alone over all the ranks")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, default=32000,
                        help="a small vocabulary lets 100K tokens of fp32 logits fit a CPU process; it changes "
                             "only the parameter count (DP bytes), not the per-token CP/TP/PP traffic")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = []
    for case in args.cases:
        mixer, seq = case.split(":")
        for axis in args.layouts:
            layout = {} if axis == "data" else {axis: world}
            results.append(measure(mixer, int(seq), layout, args.d_model, args.layers, args.vocab, args.device))
            if int(os.environ.get("RANK", "0")) == 0:
                print(json.dumps(results[-1]), flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
