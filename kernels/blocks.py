"""Tile sizes, warps and pipeline stages of each RAT kernel, per chunk size, head dim and dtype.

Measured, not autotuned: kernels/tune.py sweeps the configurations on a GPU and writes the best
per (kernel, L, d) for bf16 into blocks.json beside this file; shapes it has no entry for take
the defaults below. The choice is deterministic, costs no start-up benchmarking, and the Triton
interpreter (CPU tests) gets small tiles so that short test sequences cross several blocks.

Constraints: the forward and the query-side backward hold whole chunks per program (bq a
multiple of L, >= L); every dot needs >= 16 rows and columns; fp32 tiles (IEEE dots) take
half-size blocks to fit in shared memory.
"""
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import interpreting


@dataclass(frozen=True)
class Blocks:
    bq: int  # query rows per program (forward, query-side backward) or per loop step (summary side)
    bc: int  # summaries per loop step (forward, query side) or per program (summary side)
    warps: int
    stages: int


KERNELS = ("forward", "summary_grad", "query_grad")
TABLE = Path(__file__).with_name("blocks.json")


@functools.cache
def measured() -> dict[tuple[str, int, int], Blocks]:
    """(kernel, L, d) -> the bf16 configuration tune.py measured best (empty without blocks.json)."""
    if not TABLE.exists():
        return {}
    return {(e["kernel"], e["L"], e["d"]): Blocks(e["bq"], e["bc"], e["warps"], e["stages"])
            for e in json.loads(TABLE.read_text())["bf16"]}


def blocks(kernel: str, chunk_size: int, head_dim: int, dtype: torch.dtype) -> Blocks:
    """The launch configuration of `kernel` (one of KERNELS) for this shape."""
    L = chunk_size
    if interpreting():
        return Blocks(max(L, 16), 16, 4, 1)
    if dtype == torch.float32:
        return Blocks(max(L, 32), 32, 4, 1)
    if (kernel, L, head_dim) in measured():
        return measured()[(kernel, L, head_dim)]
    wide = head_dim > 64
    if kernel == "forward":
        return Blocks(max(L, 64 if wide else 128), 64, 8 if wide else 4, 3)
    if kernel == "summary_grad":
        return Blocks(64, 128 if L < 128 else 64, 8, 2)
    if kernel == "query_grad":
        return Blocks(max(L, 64), 64, 8 if wide else 4, 2)
    raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
