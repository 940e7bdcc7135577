"""Can one persistent grid stream a decode step's linears faster than one launch per linear?

RAT-1.3B's decode step at batch 64 reads 2.6 GB of weights through about a hundred cuBLAS launches at
about 2.1 TB/s, against the copy rate's 3.05 on an H100. Each launch ramps up and drains on its own.
The plan for a step near the weight-read floor (kernels/NOTES.md, "Batch 64 at 2.0 ms on an H100") is
one persistent grid whose programs stay resident and pass from one linear to the next at a grid
barrier. Before that is built around the mixing, this probe asks the question on the linears alone,
chained as in the step: per layer in_proj → out_proj (on in_proj's first D columns) → fc1 → fc2, each
reading the output of the one before. The norms, the mixing and the activations are left out.

- cuBLAS: one matmul launch per linear, the whole chain replayed as one CUDA graph.
- persistent: one launch of one program per SM for the whole chain. Each linear's column tiles are
  spread over the programs, and a grid barrier (an atomic counter) separates consecutive linears.
  With `prefetch`, each program asks L2 for its next tile's weights before it waits at the barrier.

Both read the same weights, one copy per layer (2.47 GB for 24 layers, far more than L2 holds). The
report gives µs per chain, the weight bytes over that time, and the largest difference from cuBLAS's
output.

    python benchmarks/persistent_linears.py --out benchmarks/results/persistent_linears_h100.json
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from generate import REPO, copy_bandwidth
from profile_decode import graphed_us
from ratpt.config import load_config
from ratpt.model.ffn import ffn_hidden
from ratpt_kernels.common import dot, ieee_dots

ROWS = 64  # the batch: one token of each sequence


@triton.jit
def _linear_tiles(x_ptr, sx, w_ptr, y_ptr, N, K, first, step,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr):
    """y[:, cols] = x Wᵀ for column tiles first, first + step, … of y [BM, N] (row stride N), where
    x is [BM, K] with row stride sx and W is [N, K]. K must be a multiple of BK."""
    rows = tl.arange(0, BM)
    for tile in range(first, tl.cdiv(N, BN), step):
        cols = tile * BN + tl.arange(0, BN)
        col_ok = cols < N
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * K
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rows[:, None] * sx + ks[None, :])
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None], other=0.0)
            acc += dot(x, tl.trans(w), w.dtype, F32)
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _prefetch_tile(w_ptr, N, K, tile, BN: tl.constexpr, LINES: tl.constexpr):
    """Ask L2 for the weight rows of column tile `tile` of W [N, K] (bf16): one request per 128-byte line."""
    rows = tile * BN + tl.arange(0, BN)
    for k0 in range(0, K, LINES * 64):
        line = k0 + tl.arange(0, LINES) * 64
        ok = (rows < N)[:, None] & (line < K)[None, :]
        ptrs = tl.where(ok, w_ptr + rows.to(tl.int64)[:, None] * K + line[None, :], w_ptr)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _grid_barrier(counter_ptr, target):
    """Wait until `target` arrivals have been counted, this program's included: every program's writes
    before its arrival are then visible to every program after it."""
    tl.debug_barrier()
    seen = tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu") + 1
    while seen < target:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _chain_kernel(x_ptr, h1_ptr, h2_ptr, h3_ptr, w_in, w_out, w_fc1, w_fc2, counter_ptr, LAYERS, D, N1, F,
                  BM: tl.constexpr, BN_IN: tl.constexpr, BN_OUT: tl.constexpr, BN_FC1: tl.constexpr,
                  BN_FC2: tl.constexpr, BK: tl.constexpr, PREFETCH: tl.constexpr, F32: tl.constexpr):
    """The whole chain in one grid: per layer in_proj (x → h1), out_proj (h1[:, :D] → h2), fc1 (h2 → h3),
    fc2 (h3 → x), with a grid barrier after each."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    for layer in range(LAYERS):
        w_in_l = w_in + layer.to(tl.int64) * N1 * D
        w_out_l = w_out + layer.to(tl.int64) * D * D
        w_fc1_l = w_fc1 + layer.to(tl.int64) * F * D
        w_fc2_l = w_fc2 + layer.to(tl.int64) * D * F
        arrivals = layer * 4 * programs
        _linear_tiles(x_ptr, D, w_in_l, h1_ptr, N1, D, pid, programs, BM, BN_IN, BK, F32)
        if PREFETCH:
            _prefetch_tile(w_out_l, D, D, pid, BN_OUT, 32)
        _grid_barrier(counter_ptr, arrivals + programs)
        _linear_tiles(h1_ptr, N1, w_out_l, h2_ptr, D, D, pid, programs, BM, BN_OUT, BK, F32)
        if PREFETCH:
            _prefetch_tile(w_fc1_l, F, D, pid, BN_FC1, 32)
        _grid_barrier(counter_ptr, arrivals + 2 * programs)
        _linear_tiles(h2_ptr, D, w_fc1_l, h3_ptr, F, D, pid, programs, BM, BN_FC1, BK, F32)
        if PREFETCH:
            _prefetch_tile(w_fc2_l, D, F, pid, BN_FC2, 32)
        _grid_barrier(counter_ptr, arrivals + 3 * programs)
        _linear_tiles(h3_ptr, F, w_fc2_l, x_ptr, D, F, pid, programs, BM, BN_FC2, BK, F32)
        if PREFETCH:
            if layer + 1 < LAYERS:
                _prefetch_tile(w_in_l + N1 * D, N1, D, pid, BN_IN, 32)
        _grid_barrier(counter_ptr, arrivals + 4 * programs)


@triton.jit
def _linear_kernel(x_ptr, sx, w_ptr, y_ptr, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   F32: tl.constexpr):
    """One linear of the chain as a launch of its own (the same tiles, no barrier): how the chain runs in
    the Triton interpreter, whose programs run one after another and so could never meet at a barrier."""
    _linear_tiles(x_ptr, sx, w_ptr, y_ptr, N, K, tl.program_id(0), tl.num_programs(0), BM, BN, BK, F32)


@dataclass(frozen=True)
class Launch:
    """Column tile widths per linear, the K step, warps, pipeline stages, L2 prefetch before each barrier."""
    bn_in: int = 64
    bn_out: int = 16
    bn_fc1: int = 64
    bn_fc2: int = 16
    bk: int = 128
    warps: int = 4
    stages: int = 3
    prefetch: bool = False

    def widths(self) -> tuple[int, int, int, int]:
        return self.bn_in, self.bn_out, self.bn_fc1, self.bn_fc2


@dataclass
class Chain:
    """A chain's weights and its activation buffers. x holds the chain's input and, after a run, its output."""
    w_in: torch.Tensor  # [layers, N1, D]
    w_out: torch.Tensor  # [layers, D, D]
    w_fc1: torch.Tensor  # [layers, F, D]
    w_fc2: torch.Tensor  # [layers, D, F]
    x: torch.Tensor  # [rows, D]

    @classmethod
    def random(cls, layers: int, d: int, n1: int, f: int, rows: int, device, dtype=torch.bfloat16) -> "Chain":
        """Weights of standard deviation 1/√K, so that activations keep their scale through the chain."""
        def weight(n, k):
            return (torch.randn(layers, n, k, device=device) / k ** 0.5).to(dtype)
        return cls(weight(n1, d), weight(d, d), weight(f, d), weight(d, f), torch.randn(rows, d, device=device).to(dtype))

    @property
    def weight_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in (self.w_in, self.w_out, self.w_fc1, self.w_fc2))

    def scratch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, n1, f = self.x.shape[0], self.w_in.shape[1], self.w_fc1.shape[1]
        return self.x.new_empty(rows, n1), self.x.new_empty(rows, self.x.shape[1]), self.x.new_empty(rows, f)


def reference(chain: Chain) -> torch.Tensor:
    """The chain by torch matmuls (cuBLAS on a GPU), in the weights' dtype."""
    x, d = chain.x, chain.x.shape[1]
    for w_in, w_out, w_fc1, w_fc2 in zip(chain.w_in, chain.w_out, chain.w_fc1, chain.w_fc2):
        x = ((x @ w_in.T)[:, :d] @ w_out.T @ w_fc1.T) @ w_fc2.T
    return x


def run_by_launches(chain: Chain, launch: Launch = Launch()) -> torch.Tensor:
    """The chain as one `_linear_kernel` launch per linear, x updated in place; returns x."""
    h1, h2, h3 = chain.scratch()
    x, d = chain.x, chain.x.shape[1]
    f32 = ieee_dots(x)
    programs = 4 if x.device.type != "cuda" else torch.cuda.get_device_properties(x.device).multi_processor_count
    bn_in, bn_out, bn_fc1, bn_fc2 = launch.widths()
    for w_in, w_out, w_fc1, w_fc2 in zip(chain.w_in, chain.w_out, chain.w_fc1, chain.w_fc2):
        for src, sx, w, dst, bn in ((x, d, w_in, h1, bn_in), (h1, h1.shape[1], w_out, h2, bn_out),
                                    (h2, d, w_fc1, h3, bn_fc1), (h3, h3.shape[1], w_fc2, x, bn_fc2)):
            _linear_kernel[(programs,)](src, sx, w, dst, w.shape[0], w.shape[1], BM=x.shape[0], BN=bn,
                                        BK=launch.bk, F32=f32, num_warps=launch.warps, num_stages=launch.stages)
    return x


def persistent_call(chain: Chain, launch: Launch):
    """An argument-free function that runs the whole chain in one persistent launch (x in place)."""
    h1, h2, h3 = chain.scratch()
    counter = torch.zeros(1, device=chain.x.device, dtype=torch.int32)
    programs = torch.cuda.get_device_properties(chain.x.device).multi_processor_count
    layers, n1, d = chain.w_in.shape
    bn_in, bn_out, bn_fc1, bn_fc2 = launch.widths()

    def call():
        counter.zero_()
        _chain_kernel[(programs,)](chain.x, h1, h2, h3, chain.w_in, chain.w_out, chain.w_fc1, chain.w_fc2, counter,
                                   layers, d, n1, chain.w_fc1.shape[1], BM=chain.x.shape[0], BN_IN=bn_in,
                                   BN_OUT=bn_out, BN_FC1=bn_fc1, BN_FC2=bn_fc2, BK=launch.bk,
                                   PREFETCH=launch.prefetch, F32=False, num_warps=launch.warps,
                                   num_stages=launch.stages, launch_cooperative_grid=True)
    return call


def timed_us(chain: Chain, x0: torch.Tensor, call, repeats: int) -> tuple[float, torch.Tensor]:
    """µs per run of `call` (x reset to x0 first), replayed as a CUDA graph; and the output of one run."""
    def run():
        chain.x.copy_(x0)
        call()
    us = graphed_us([run], repeats)
    run()
    return us, chain.x.clone()


def launches(args: argparse.Namespace) -> list[Launch]:
    widths = [tuple(map(int, w.split("/"))) for w in args.widths.split(",")]
    return [Launch(*w, bk=bk, warps=warps, stages=stages, prefetch=bool(pf))
            for w, bk, warps, stages, pf in itertools.product(
                widths, map(int, args.bk.split(",")), map(int, args.warps.split(",")),
                map(int, args.stages.split(",")), map(int, args.prefetch.split(",")))]


def benchmark(args: argparse.Namespace) -> dict:
    cfg = load_config(REPO / "configs" / f"{args.config}.yaml").model
    d, f, qk = cfg.d_model, ffn_hidden(cfg), cfg.ngroups * cfg.head_dim
    torch.manual_seed(0)
    chain = Chain.random(args.layers or cfg.n_layers, d, 3 * d + 2 * qk, f, ROWS, "cuda")
    x0 = chain.x.clone()
    copy = copy_bandwidth(chain.x.device)
    rows = []

    def record(name: str, us: float, out: torch.Tensor, expected: torch.Tensor, **fields) -> None:
        error = ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
        rows.append({"path": name, **fields, "us": us, "tb_per_s": chain.weight_bytes / us / 1e6,
                     "of_copy_rate": chain.weight_bytes / us / 1e6 / (copy / 1e12) if copy else None,
                     "max_error_vs_cublas": error})
        print(json.dumps(rows[-1]), flush=True)

    us, expected = timed_us(chain, x0, lambda: chain.x.copy_(reference(chain)), args.repeats)
    record("cuBLAS, one launch per linear", us, expected, expected)
    for launch in launches(args):
        us, out = timed_us(chain, x0, persistent_call(chain, launch), args.repeats)
        record("persistent", us, out, expected, **launch.__dict__)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "config": args.config, "rows": ROWS, "layers": chain.w_in.shape[0], "weight_gb": chain.weight_bytes / 1e9,
            "copy_tb_per_s": copy / 1e12 if copy else None, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rat_1p3b", help="the model whose linears are chained")
    parser.add_argument("--layers", type=int, default=0, help="0: the model's")
    parser.add_argument("--widths", default="64/16/64/16,32/16/64/16,64/16/128/16",
                        help="column tile widths in_proj/out_proj/fc1/fc2, comma-separated choices")
    parser.add_argument("--bk", default="128")
    parser.add_argument("--warps", default="4")
    parser.add_argument("--stages", default="3,4")
    parser.add_argument("--prefetch", default="0,1")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "persistent_linears.json")
    args = parser.parse_args()
    args.out.write_text(json.dumps(benchmark(args), indent=1))


if __name__ == "__main__":
    main()
