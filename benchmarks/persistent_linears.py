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
  spread over the programs, and a grid barrier (an atomic counter) separates consecutive linears;
  out_proj and fc2 (N 2048, too narrow to give every SM a 64-column tile) run in pieces of K whose
  partial products are summed after one more barrier.
  With `prefetch`, each program asks L2 for its next tile's weights before it waits at the barrier.
  With `tma`, the weight tiles come through TMA descriptors (the copy engine, one request per tile)
  instead of per-thread loads: the question after the first answer, whether the 64-row tile itself
  streams faster that way.

Both read the same weights, one copy per layer (2.47 GB for 24 layers, far more than L2 holds). The
report gives µs per chain, the weight bytes over that time, and the largest difference from cuBLAS's
output.

    python benchmarks/persistent_linears.py --out benchmarks/results/persistent_linears_h100.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from generate import REPO, copy_bandwidth
from profile_decode import cuda_us, graphed_us
from ratpt.config import load_config
from ratpt.model.ffn import ffn_hidden
from ratpt_kernels.common import dot, ieee_dots, sm_count

log = logging.getLogger(__name__)
ROWS = 64  # the batch: one token of each sequence


@triton.jit
def _linear_tiles(x_ptr, sx, w_ptr, w_desc, layer, y_ptr, N, K, first, step, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, SPLIT: tl.constexpr, F32: tl.constexpr, TMA: tl.constexpr):
    """y = x Wᵀ over tiles first, first + step, … of (column block, piece of K), for x [BM, K] (row stride
    sx) and W = layer `layer` of the stacked weights [layers, N, K] at w_ptr (TMA: loaded through w_desc,
    their descriptor in [1, BN, BK] blocks). Unsplit (SPLIT 1) y is [BM, N]; split, piece s of K writes its
    fp32 partial product to y[s] of y [SPLIT, BM, N], and _sum_pieces adds them. K must be a multiple of
    SPLIT · BK."""
    rows = tl.arange(0, BM)
    k_piece = K // SPLIT
    for tile in range(first, tl.cdiv(N, BN) * SPLIT, step):
        piece = tile % SPLIT
        cols = (tile // SPLIT) * BN + tl.arange(0, BN)
        col_ok = cols < N
        w_rows = w_ptr + (layer.to(tl.int64) * N + cols.to(tl.int64))[:, None] * K
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(piece * k_piece, (piece + 1) * k_piece, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rows[:, None] * sx + ks[None, :])
            if TMA:
                w = w_desc.load([layer, (tile // SPLIT) * BN, k0]).reshape(BN, BK)
            else:
                w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None], other=0.0)
            acc += dot(x, tl.trans(w), w.dtype, F32)
        out = y_ptr + piece * BM * N + rows[:, None] * N + cols[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _sum_pieces(part_ptr, y_ptr, size, first, step, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """y = Σ_s part[s] (part [SPLIT, size] fp32, y [size]) over element blocks first, first + step, …"""
    for block in range(first, tl.cdiv(size, BLOCK), step):
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        ok = offsets < size
        total = tl.zeros((BLOCK,), tl.float32)
        for s in tl.static_range(SPLIT):
            total += tl.load(part_ptr + s * size + offsets, mask=ok, other=0.0)
        tl.store(y_ptr + offsets, total.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _prefetch_tile(w_ptr, layer, N, K, tile, BN: tl.constexpr, SPLIT: tl.constexpr, LINES: tl.constexpr):
    """Ask L2 for the weights of tile `tile` (as _linear_tiles numbers them) of W = layer `layer` of the
    stacked weights [layers, N, K] (bf16) at w_ptr: one request per 128-byte line."""
    w_ptr += layer.to(tl.int64) * N * K
    rows = (tile // SPLIT) * BN + tl.arange(0, BN)
    k_piece = K // SPLIT
    k_first = (tile % SPLIT) * k_piece
    for k0 in range(k_first, k_first + k_piece, LINES * 64):
        line = k0 + tl.arange(0, LINES) * 64
        ok = (rows < N)[:, None] & (line < k_first + k_piece)[None, :]
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
def _phase(x_ptr, sx, w_ptr, w_desc, layer, y_ptr, part_ptr, N, K, next_w, next_layer, next_n, next_k, counter_ptr,
           passed, pid, programs, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, NEXT_BN: tl.constexpr,
           NEXT_SPLIT: tl.constexpr, BK: tl.constexpr, PREFETCH: tl.constexpr, F32: tl.constexpr,
           TMA: tl.constexpr):
    """One linear of the chain by every program (split: its partials, a barrier, their sum), then the
    L2 prefetch of this program's first tile of the next linear, then the barrier before it. Returns
    the barriers passed so far."""
    if SPLIT == 1:
        _linear_tiles(x_ptr, sx, w_ptr, w_desc, layer, y_ptr, N, K, pid, programs, BM, BN, BK, 1, F32, TMA)
    else:
        _linear_tiles(x_ptr, sx, w_ptr, w_desc, layer, part_ptr, N, K, pid, programs, BM, BN, BK, SPLIT, F32, TMA)
        passed += 1
        _grid_barrier(counter_ptr, passed * programs)
        _sum_pieces(part_ptr, y_ptr, BM * N, pid, programs, SPLIT, 1024)
    if PREFETCH:
        _prefetch_tile(next_w, next_layer, next_n, next_k, pid, NEXT_BN, NEXT_SPLIT, 32)
    passed += 1
    _grid_barrier(counter_ptr, passed * programs)
    return passed


@triton.jit
def _chain_kernel(x_ptr, h1_ptr, h2_ptr, h3_ptr, part_ptr, w_in, w_out, w_fc1, w_fc2, d_in, d_out, d_fc1, d_fc2,
                  counter_ptr, LAYERS, D, N1, F, BM: tl.constexpr, BN_IN: tl.constexpr, BN_OUT: tl.constexpr,
                  BN_FC1: tl.constexpr, BN_FC2: tl.constexpr, SPLIT_OUT: tl.constexpr, SPLIT_FC2: tl.constexpr,
                  BK: tl.constexpr, PREFETCH: tl.constexpr, F32: tl.constexpr, TMA: tl.constexpr):
    """The whole chain in one grid: per layer in_proj (x → h1), out_proj (h1[:, :D] → h2), fc1 (h2 → h3),
    fc2 (h3 → x), each followed by a grid barrier. d_*: the weights' TMA descriptors."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    passed = 0
    for layer in range(LAYERS):
        # the last layer prefetches its own in_proj again: harmless, and it keeps the branch out of the loop
        next_layer = tl.minimum(layer + 1, LAYERS - 1)
        passed = _phase(x_ptr, D, w_in, d_in, layer, h1_ptr, part_ptr, N1, D, w_out, layer, D, D, counter_ptr,
                        passed, pid, programs, BM, BN_IN, 1, BN_OUT, SPLIT_OUT, BK, PREFETCH, F32, TMA)
        passed = _phase(h1_ptr, N1, w_out, d_out, layer, h2_ptr, part_ptr, D, D, w_fc1, layer, F, D, counter_ptr,
                        passed, pid, programs, BM, BN_OUT, SPLIT_OUT, BN_FC1, 1, BK, PREFETCH, F32, TMA)
        passed = _phase(h2_ptr, D, w_fc1, d_fc1, layer, h3_ptr, part_ptr, F, D, w_fc2, layer, D, F, counter_ptr,
                        passed, pid, programs, BM, BN_FC1, 1, BN_FC2, SPLIT_FC2, BK, PREFETCH, F32, TMA)
        passed = _phase(h3_ptr, F, w_fc2, d_fc2, layer, x_ptr, part_ptr, D, F, w_in, next_layer, N1, D, counter_ptr,
                        passed, pid, programs, BM, BN_FC2, SPLIT_FC2, BN_IN, 1, BK, PREFETCH, F32, TMA)


@triton.jit
def _linear_kernel(x_ptr, sx, w_ptr, w_desc, layer, y_ptr, N, K, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, SPLIT: tl.constexpr, F32: tl.constexpr, TMA: tl.constexpr):
    """One linear of the chain as a launch of its own (the same tiles, no barrier): how the chain runs in
    the Triton interpreter, whose programs run one after another and so could never meet at a barrier."""
    _linear_tiles(x_ptr, sx, w_ptr, w_desc, layer, y_ptr, N, K, tl.program_id(0), tl.num_programs(0), BM, BN, BK,
                  SPLIT, F32, TMA)


@triton.jit
def _sum_kernel(part_ptr, y_ptr, size, SPLIT: tl.constexpr):
    _sum_pieces(part_ptr, y_ptr, size, tl.program_id(0), tl.num_programs(0), SPLIT, 1024)


@dataclass(frozen=True)
class Launch:
    """Column tile widths per linear, pieces of K for out_proj and fc2 (the two weights too narrow to give
    every SM a column block of 64), the K step, warps, pipeline stages, L2 prefetch before each barrier,
    weight tiles through TMA."""
    bn_in: int = 64
    bn_out: int = 64
    bn_fc1: int = 64
    bn_fc2: int = 64
    split_out: int = 4
    split_fc2: int = 4
    bk: int = 64
    warps: int = 4
    stages: int = 3
    prefetch: bool = False
    tma: bool = False

    def tiles(self) -> tuple[tuple[int, int], ...]:
        """(column block, pieces of K) of in_proj, out_proj, fc1, fc2."""
        return (self.bn_in, 1), (self.bn_out, self.split_out), (self.bn_fc1, 1), (self.bn_fc2, self.split_fc2)

    def descriptors(self, chain: "Chain") -> tuple[TensorDescriptor, ...]:
        """TMA descriptors of in_proj's, out_proj's, fc1's and fc2's stacked weights in this launch's tiles."""
        return tuple(TensorDescriptor.from_tensor(w, [1, bn, self.bk])
                     for w, (bn, _) in zip(chain.weights, self.tiles()))


@dataclass
class Chain:
    """A chain's weights and its input x, which a run overwrites with the output (scratch() gives the rest)."""
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
    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.w_in, self.w_out, self.w_fc1, self.w_fc2

    @property
    def weight_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights)

    def scratch(self, pieces: int) -> tuple[torch.Tensor, ...]:
        """h1, h2, h3 (the outputs of in_proj, out_proj, fc1) and the partial products of a split linear."""
        rows, d, n1, f = self.x.shape[0], self.x.shape[1], self.w_in.shape[1], self.w_fc1.shape[1]
        part = self.x.new_empty(pieces, rows, d, dtype=torch.float32)
        return self.x.new_empty(rows, n1), self.x.new_empty(rows, d), self.x.new_empty(rows, f), part


def reference(chain: Chain) -> torch.Tensor:
    """The chain by torch matmuls (cuBLAS on a GPU), in the weights' dtype."""
    x, d = chain.x, chain.x.shape[1]
    for w_in, w_out, w_fc1, w_fc2 in zip(chain.w_in, chain.w_out, chain.w_fc1, chain.w_fc2):
        x = ((x @ w_in.T)[:, :d] @ w_out.T @ w_fc1.T) @ w_fc2.T
    return x


def run_by_launches(chain: Chain, launch: Launch = Launch()) -> torch.Tensor:
    """The chain as one `_linear_kernel` launch per linear (and a `_sum_kernel` launch after a split one),
    x updated in place; returns x."""
    h1, h2, h3, part = chain.scratch(max(launch.split_out, launch.split_fc2))
    x, d = chain.x, chain.x.shape[1]
    f32 = ieee_dots(x)
    programs = 4 if x.device.type != "cuda" else sm_count(x.device.index)
    descriptors = launch.descriptors(chain)
    for layer in range(chain.w_in.shape[0]):
        for (src, sx, dst), w, w_desc, (bn, split) in zip(
                ((x, d, h1), (h1, h1.shape[1], h2), (h2, d, h3), (h3, h3.shape[1], x)), chain.weights, descriptors,
                launch.tiles()):
            _linear_kernel[(programs,)](src, sx, w, w_desc, layer, dst if split == 1 else part, w.shape[1], w.shape[2],
                                        BM=x.shape[0], BN=bn, BK=launch.bk, SPLIT=split, F32=f32, TMA=launch.tma,
                                        num_warps=launch.warps, num_stages=launch.stages)
            if split > 1:
                _sum_kernel[(programs,)](part, dst, dst.numel(), SPLIT=split)
    return x


def persistent_call(chain: Chain, launch: Launch):
    """An argument-free function that runs the whole chain in one persistent launch (x in place)."""
    h1, h2, h3, part = chain.scratch(max(launch.split_out, launch.split_fc2))
    counter = torch.zeros(1, device=chain.x.device, dtype=torch.int32)
    programs = sm_count(chain.x.device.index)
    layers, n1, d = chain.w_in.shape
    descriptors = launch.descriptors(chain)

    def call():
        counter.zero_()
        _chain_kernel[(programs,)](chain.x, h1, h2, h3, part, *chain.weights, *descriptors, counter, layers, d, n1,
                                   chain.w_fc1.shape[1], BM=chain.x.shape[0], BN_IN=launch.bn_in,
                                   BN_OUT=launch.bn_out, BN_FC1=launch.bn_fc1, BN_FC2=launch.bn_fc2,
                                   SPLIT_OUT=launch.split_out, SPLIT_FC2=launch.split_fc2, BK=launch.bk,
                                   PREFETCH=launch.prefetch, F32=False, TMA=launch.tma, num_warps=launch.warps,
                                   num_stages=launch.stages, launch_cooperative_grid=True)
    return call


def timed_us(chain: Chain, x0: torch.Tensor, call, repeats: int) -> tuple[dict, torch.Tensor]:
    """µs per run of `call` (x reset to x0 first), launched from Python and replayed as a CUDA graph (None
    where the capture fails: the persistent launch is one launch either way, so its eager time stands);
    and the output of one run."""
    def run():
        chain.x.copy_(x0)
        call()
    run()
    times = {"eager_us": cuda_us(run, repeats), "graphed_us": None}
    try:
        times["graphed_us"] = graphed_us([run], repeats)
    except RuntimeError as err:
        log.warning("no CUDA graph of this launch (%s): its eager time stands", str(err)[:200])
    run()
    return times, chain.x.clone()


def launches(args: argparse.Namespace) -> list[Launch]:
    """Every combination of the command line's choices."""
    def choices(text: str, sep: str) -> list[tuple[int, ...]]:
        return [tuple(map(int, choice.split(sep))) for choice in text.split(",")]
    return [Launch(*tiles, bk=bk, stages=stages, warps=warps, prefetch=bool(prefetch), tma=bool(tma))
            for tiles, (bk, stages), (warps,), (prefetch,), (tma,) in itertools.product(
                choices(args.tiles, "/"), choices(args.pipelines, "x"), choices(args.warps, "/"),
                choices(args.prefetch, "/"), choices(args.tma, "/"))]


def benchmark(args: argparse.Namespace) -> dict:
    cfg = load_config(REPO / "configs" / f"{args.config}.yaml").model
    d, f, qk = cfg.d_model, ffn_hidden(cfg), cfg.ngroups * cfg.head_dim
    torch.manual_seed(0)
    chain = Chain.random(args.layers or cfg.n_layers, d, 3 * d + 2 * qk, f, ROWS, "cuda")
    x0 = chain.x.clone()
    copy = copy_bandwidth(chain.x.device)
    rows = []

    def record(name: str, times: dict, out: torch.Tensor, expected: torch.Tensor, **fields) -> None:
        error = ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
        us = times["graphed_us"] or times["eager_us"]
        rows.append({"path": name, **fields, **times, "us": us, "tb_per_s": chain.weight_bytes / us / 1e6,
                     "of_copy_rate": chain.weight_bytes / us / 1e6 / (copy / 1e12) if copy else None,
                     "max_error_vs_cublas": error})
        print(json.dumps(rows[-1]), flush=True)

    times, expected = timed_us(chain, x0, lambda: chain.x.copy_(reference(chain)), args.repeats)
    record("cuBLAS, one launch per linear", times, expected, expected)
    for launch in launches(args):
        try:
            times, out = timed_us(chain, x0, persistent_call(chain, launch), args.repeats)
        except (OutOfResources, RuntimeError) as err:  # more shared memory than an SM has, or no co-residency
            rows.append({"path": "persistent", **launch.__dict__, "error": str(err)[:300]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        record("persistent", times, out, expected, **launch.__dict__)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "config": args.config, "rows": ROWS, "layers": chain.w_in.shape[0], "weight_gb": chain.weight_bytes / 1e9,
            "copy_tb_per_s": copy / 1e12 if copy else None, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="rat_1p3b", help="the model whose linears are chained")
    parser.add_argument("--layers", type=int, default=0, help="0: the model's")
    parser.add_argument("--tiles", default="64/64/64/64/2/2,32/32/64/32/2/2",
                        help="column tile widths in_proj/out_proj/fc1/fc2 and pieces of K out_proj/fc2, "
                             "comma-separated choices")
    parser.add_argument("--pipelines", default="128x4,64x8,64x6",
                        help="K step x pipeline stages, comma-separated choices")
    parser.add_argument("--warps", default="4")
    parser.add_argument("--prefetch", default="0")
    parser.add_argument("--tma", default="0,1", help="weight tiles through TMA descriptors: 0, 1 or both")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "persistent_linears.json")
    args = parser.parse_args()
    args.out.write_text(json.dumps(benchmark(args), indent=1))


if __name__ == "__main__":
    main()
