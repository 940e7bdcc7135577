"""Attention's decode mixing alone: the length-aware kernel against the masked reference and the copy ceiling.

One layer of attention-1.3B's shape (H 16, d 128, bf16), random caches of `--slots` slots, every
sequence at `--position` (visible slots = position + 1), each timed as the median of CUDA-event timings:
  - the kernel (ratpt_kernels.attention_decode) over its launches (slots per block, warps, stages,
    splits; splits 0 = its default) and its products (FMAs, or tensor-core dots with --dots 1),
  - the reference (ratpt.ops.attention_decode_reference: SDPA with a mask over every slot, the
    path the kernel replaces),
  - the copy ceiling: a device-to-device copy of as many bytes as the visible (k, v) rows, whose
    rate counts the bytes read and written.
Bandwidth = visible (k, v) bytes / time. The defaults are benchmarks/generate.py's batch 64 at the
middle of its decode (prompt 3072, 1024 new tokens).

    python benchmarks/attention_decode.py --out benchmarks/results/attention_decode.json
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from ratpt.ops import attention_decode_reference
from ratpt_kernels import attention_decode
from ratpt_kernels.tune import time_ms

REPO = Path(__file__).resolve().parents[1]


def benchmark(args: argparse.Namespace) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, H, S, d = args.batch, args.heads, args.slots, args.head_dim
    q = torch.randn(B, H, 1, d, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(B, H, S, d, device="cuda", generator=gen).bfloat16() for _ in range(2))
    visible = torch.full((B,), args.position + 1, device="cuda")
    read = 2 * B * H * (args.position + 1) * d * 2

    def rate(ms: float, nbytes: float = read) -> float:
        return nbytes / (ms / 1000) / 1e12

    source = torch.empty(read // 2, device="cuda", dtype=torch.bfloat16)
    target = torch.empty_like(source)
    copy_ms = time_ms(lambda: target.copy_(source), args.iters, warmup=2)
    reference_ms = time_ms(lambda: attention_decode_reference(q, k, v, visible), args.iters, warmup=2)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": B, "heads": H,
              "head_dim": d, "slots": S, "position": args.position, "visible_gb": read / 1e9,
              "copy": {"ms": copy_ms, "tb_per_s_read_and_written": rate(copy_ms, 2 * read)},
              "reference": {"ms": reference_ms, "tb_per_s": rate(reference_ms)}, "kernel": []}
    for block, warps, stages, splits, dots in itertools.product(
            *(map(int, a.split(",")) for a in (args.blocks, args.warps, args.stages, args.splits, args.dots))):
        ms = time_ms(lambda: attention_decode(q, k, v, visible, splits=splits or None, block=block, warps=warps,
                                              stages=stages, dots=bool(dots)), args.iters, warmup=2)
        result["kernel"].append({"block": block, "warps": warps, "stages": stages, "splits": splits,
                                 "dots": bool(dots), "ms": ms, "tb_per_s": rate(ms)})
        print(json.dumps(result["kernel"][-1]), flush=True)
    result["best"] = min(result["kernel"], key=lambda r: r["ms"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--slots", type=int, default=4096)
    parser.add_argument("--position", type=int, default=3583)
    parser.add_argument("--blocks", default="32,64,128", help="slots per loop step")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--splits", default="0,1", help="splits per (sequence, head); 0 = the kernel's default")
    parser.add_argument("--dots", default="0,1", help="1: tensor-core products (the kernel's `dots`), 0: FMAs")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "attention_decode.json")
    args = parser.parse_args()
    result = benchmark(args)
    print(json.dumps({k: result[k] for k in ("copy", "reference", "best")}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
