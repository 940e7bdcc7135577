"""A decode step's linear layers with their neighbours fused in (the fast path of ratpt.ops.decode_linear).

At a few rows a linear layer streams its weight once and does almost no arithmetic: its cost is the
weight read plus a launch, and the RMSNorm before it, the activation after it and the residual add
each cost a launch of their own that moves a few KB. One kernel does all of it:

    y = act(RMSNorm(x) Wᵀ) + residual          x [M, K] (M <= MAX_ROWS), W [N, K] (nn.Linear's)

Program n owns BLOCK_N output columns and every row (padded to a tile of 16 to MAX_ROWS), walking K in
BLOCK_K steps: each weight element is read once, x (M·K values) from L2 by every program. The norm
takes no pass of its own: Σ x² accumulates beside the dot of (x ⊙ norm weight) with W, and the row's
1 / rms scales the accumulator at the end. That is the module's product up to rounding (the module
rounds the normed x to the model dtype before multiplying by the norm weight; here x ⊙ norm weight is
rounded once, and 1 / rms applied in fp32). SwiGLU (W [2F, K] packing gate and up rows) reads the gate
rows n and the up rows F + n in the same program and returns silu(gate) ⊙ up.

A few rows (M <= FMA_ROWS, batch 1 above all): a tensor-core tile would be 16 rows for one, and the launch
that feeds it (64-column blocks, one per SM) streams the weight at half the copy rate. There the kernel
multiplies each [BLOCK_N, BLOCK_K] weight tile with every row by fp32 FMAs and sums along K, so narrow
column blocks (many programs per SM, many loads in flight) carry the weight read; x and the norm's product
stay in fp32.

Split K (`split` > 1): a weight too narrow to give every SM its own column blocks (fc2: N 2048, K 8192)
is also cut along K. Program (n, s) then writes its fp32 partial products and partial Σ x² to a scratch
buffer, and a second launch sums the `split` pieces of each column block and applies the norm's scale,
the activation and the residual: the norm scale and the sums commute, so the result is the unsplit one
up to the order of the fp32 additions.
"""
import torch
import triton
import triton.language as tl

from .common import after_predecessor, dependent_launch, dot, ieee_dots, launch_options, sm_count

MAX_ROWS = 64  # rows one program holds; larger batches use cuBLAS (ratpt.ops.decode_linear)
FMA_ROWS = 4  # at most this many rows: FMAs instead of a tensor-core tile
ACTIVATIONS = ("none", "gelu", "swiglu")


@triton.jit
def _epilogue(acc, up, squares, res_ptr, y_ptr, rows, cols, M, N, K, sr, sy, eps,
              NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr):
    """y = act(acc · 1/rms) (⊙ up's scaled half for SwiGLU) + residual, stored for these rows and columns."""
    if NORM:
        scale = tl.rsqrt(squares / K + eps)[:, None]
        acc *= scale
        up *= scale
    if ACT == 1:  # exact GELU, as F.gelu's default
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if ACT == 2:
        acc = acc * tl.sigmoid(acc) * up
    out_mask = (rows < M)[:, None] & (cols < N)[None, :]
    if RESIDUAL:
        acc += tl.load(res_ptr + rows[:, None] * sr + cols[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * sy + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _weight_tile(w_rows, ks, col_ok, N, K, sw, ACT: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] weight tile at columns ks, and SwiGLU's up rows beside it (else w again)."""
    w_mask = col_ok[:, None] & (ks < K)[None, :]
    w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)
    if ACT == 2:  # the up rows, F = N rows below the gate rows
        u = tl.load(w_rows + N * sw + ks[None, :], mask=w_mask, other=0.0)
    else:
        u = w
    return w, u


@triton.jit
def _accumulate(acc, up, squares, w, u, x_ptr, norm_ptr, rows, ks, M, K, sx,
                NORM: tl.constexpr, ACT: tl.constexpr, FMA: tl.constexpr, BM: tl.constexpr, F32: tl.constexpr):
    """acc (and SwiGLU's up) += the rows of x at columns ks (times the norm weight) by this weight tile;
    squares += their Σ x²."""
    k_ok = ks < K
    if FMA:
        wf = w.to(tl.float32)
        uf = u.to(tl.float32)
        if NORM:
            g = tl.load(norm_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        for r in tl.static_range(BM):
            # a padded row (r >= M) reads the last real one again; the epilogue does not store it
            xr = tl.load(x_ptr + tl.minimum(r, M - 1) * sx + ks, mask=k_ok, other=0.0).to(tl.float32)
            here = rows == r
            if NORM:
                squares += tl.where(here, tl.sum(xr * xr, 0), 0.0)
                xr *= g
            acc += tl.where(here[:, None], tl.sum(wf * xr[None, :], 1)[None, :], 0.0)
            if ACT == 2:
                up += tl.where(here[:, None], tl.sum(uf * xr[None, :], 1)[None, :], 0.0)
    else:
        x = tl.load(x_ptr + rows[:, None] * sx + ks[None, :], mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            squares += tl.sum(xf * xf, 1)
            x = xf * tl.load(norm_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        acc += dot(x, tl.trans(w), w.dtype, F32)
        if ACT == 2:
            up += dot(x, tl.trans(u), w.dtype, F32)
    return acc, up, squares


@triton.jit
def _decode_linear_kernel(x_ptr, w_ptr, norm_ptr, res_ptr, y_ptr, part_ptr, M, N, K, k_per_split,
                          sx, sw, sr, sy, eps,
                          NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, SPLIT: tl.constexpr,
                          FMA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          F32: tl.constexpr, PDL: tl.constexpr):
    rows = tl.arange(0, BM)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * sw
    k_first = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_first + k_per_split, K)
    # the first weight tile streams in while the previous kernel finishes: no kernel of a step writes weights
    ks = k_first + tl.arange(0, BK)
    w, u = _weight_tile(w_rows, ks, col_ok, N, K, sw, ACT)
    after_predecessor(PDL)
    acc, up, squares = _accumulate(tl.zeros((BM, BN), tl.float32), tl.zeros((BM, BN), tl.float32),
                                   tl.zeros((BM,), tl.float32), w, u, x_ptr, norm_ptr, rows, ks, M, K, sx,
                                   NORM, ACT, FMA, BM, F32)
    for k0 in range(k_first + BK, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        w, u = _weight_tile(w_rows, ks, col_ok, N, K, sw, ACT)
        acc, up, squares = _accumulate(acc, up, squares, w, u, x_ptr, norm_ptr, rows, ks, M, K, sx,
                                       NORM, ACT, FMA, BM, F32)
    if SPLIT == 1:
        _epilogue(acc, up, squares, res_ptr, y_ptr, rows, cols, M, N, K, sr, sy, eps, NORM, ACT, RESIDUAL)
    else:  # partials [SPLIT, 2 (acc, up), BM, N + 1]: column N holds the row's partial Σ x²
        part = part_ptr + tl.program_id(1) * 2 * BM * (N + 1) + rows[:, None] * (N + 1) + cols[None, :]
        tl.store(part, acc, mask=col_ok[None, :])
        if ACT == 2:
            tl.store(part + BM * (N + 1), up, mask=col_ok[None, :])
        if NORM:
            if tl.program_id(0) == 0:  # every column block has the same Σ x²; one stores it
                tl.store(part_ptr + tl.program_id(1) * 2 * BM * (N + 1) + rows * (N + 1) + N, squares)


@triton.jit
def _decode_linear_reduce(part_ptr, res_ptr, y_ptr, M, N, K, sr, sy, eps,
                          NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, SPLIT: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr):
    """The split-K launch's second pass: sums the SPLIT partials of BN columns, then the epilogue."""
    after_predecessor(PDL)
    rows = tl.arange(0, BM)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_ok = cols < N
    acc = tl.zeros((BM, BN), tl.float32)
    up = tl.zeros((BM, BN), tl.float32)
    squares = tl.zeros((BM,), tl.float32)
    for s in range(SPLIT):
        part = part_ptr + s * 2 * BM * (N + 1) + rows[:, None] * (N + 1) + cols[None, :]
        acc += tl.load(part, mask=col_ok[None, :], other=0.0)
        if ACT == 2:
            up += tl.load(part + BM * (N + 1), mask=col_ok[None, :], other=0.0)
        if NORM:
            squares += tl.load(part_ptr + s * 2 * BM * (N + 1) + rows * (N + 1) + N)
    _epilogue(acc, up, squares, res_ptr, y_ptr, rows, cols, M, N, K, sr, sy, eps, NORM, ACT, RESIDUAL)


def default_launch(n: int, rows: int, device: torch.device) -> tuple[int, int, int, int]:
    """(block_n, block_k, warps, stages) for an N-column weight at `rows` rows, from the launch sweep on an
    H100 (benchmarks/profile_decode.py --sweep-linear, batches 1 and 64, kernels/NOTES.md). Tensor-core
    tiles (more than FMA_ROWS rows): where 64-column blocks still give most SMs a program (N >= 6656 in
    RAT-1.3B: norm + in_proj, fc1), they stream the most weight per program and win (at one row 19.7 µs
    against 52 µs for 16-column blocks); narrower weights (N = D = 2048: out_proj, fc2) take 16-column
    blocks walking K in 256-wide steps. FMA rows: 8-column blocks walking K in 512-wide steps, the best or
    within 2% of it on every RAT-1.3B linear at one row (norm + in_proj 11.3 µs, cuBLAS with its
    neighbours 22.5; norm + fc1 13.6 against 29.7; out_proj 6.4 against 7.6)."""
    if rows <= FMA_ROWS:
        return 8, 512, 4, 2
    sms = 4 if device.type != "cuda" else sm_count(device.index)
    if triton.cdiv(n, 64) * 4 >= 3 * sms:
        return 64, 64, 4, 4
    return 16, 256, 4, 3


def default_split(n: int, k: int, rows: int) -> int:
    """Pieces of K: 4 for a weight at least four times deeper than wide (fc2) at FMA rows, where 256
    column blocks alone leave the SMs short of loads (one row: 14.8 µs split in 4, 25.9 whole, cuBLAS's
    split-K 16.5); else 1."""
    return 4 if rows <= FMA_ROWS and k >= 4 * n else 1


@torch.library.custom_op("ratpt::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                  activation: str, residual: torch.Tensor | None, block_n: int = 0, block_k: int = 0,
                  warps: int = 0, stages: int = 0, split: int = 0, pdl: bool | None = None) -> torch.Tensor:
    """act(RMSNorm(x) Wᵀ) + residual [M, N] in x's dtype, for x [M, K] with M <= MAX_ROWS (by FMAs up to
    FMA_ROWS, a tensor-core tile above); the norm if `norm_weight` is given, the residual [M, N] if given;
    `activation` one of ACTIVATIONS (N = rows of W, or half of them for swiglu). block_n, block_k, warps,
    stages: the launch, each 0 for default_launch's; split: pieces of K run by separate programs and summed
    by a second launch (benchmarks/profile_decode.py --sweep-linear measures them), 0 for default_split's;
    pdl: launch as programmatic dependents (None: common.dependent_launch's answer for x's device)."""
    M, K = x.shape
    if M > MAX_ROWS:
        raise ValueError(f"decode_linear takes at most {MAX_ROWS} rows, got {M}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, t in {"x": x, "weight": weight, "residual": x if residual is None else residual}.items():
        if t.stride(-1) != 1:
            raise ValueError(f"decode_linear needs {name} contiguous in its last dim, got strides {t.stride()}")
    N = weight.shape[0] // 2 if activation == "swiglu" else weight.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    launch = default_launch(N, M, x.device)
    block_n, block_k, warps, stages = (given or default for given, default in
                                       zip((block_n, block_k, warps, stages), launch))
    k_per_split = triton.cdiv(triton.cdiv(K, split or default_split(N, K, M)), block_k) * block_k
    split = triton.cdiv(K, k_per_split)  # no empty piece
    fma = M <= FMA_ROWS
    bm = triton.next_power_of_2(M) if fma else max(16, triton.next_power_of_2(M))
    # the partials' scratch; unsplit, the kernel stores none (y stands in for the pointer)
    parts = x.new_empty((split, 2, bm, N + 1), dtype=torch.float32) if split > 1 else y
    flags = dict(NORM=norm_weight is not None, ACT=ACTIVATIONS.index(activation), RESIDUAL=residual is not None,
                 SPLIT=split, BM=bm, BN=block_n, PDL=dependent_launch(x.device) if pdl is None else pdl)
    res = y if residual is None else residual
    _decode_linear_kernel[(triton.cdiv(N, block_n), split)](
        x, weight, x if norm_weight is None else norm_weight, res, y, parts, M, N, K, k_per_split,
        x.stride(0), weight.stride(0), res.stride(0), y.stride(0), eps, **flags, FMA=fma, BK=block_k,
        F32=ieee_dots(x), num_warps=warps, num_stages=stages,
        **launch_options(flags["PDL"]))
    if split > 1:
        _decode_linear_reduce[(triton.cdiv(N, block_n),)](parts, res, y, M, N, K, res.stride(0), y.stride(0), eps,
                                                          **flags, num_warps=4, **launch_options(flags["PDL"]))
    return y


@decode_linear.register_fake
def _decode_linear_shape(x, weight, norm_weight, eps, activation, residual, block_n=0, block_k=0, warps=0, stages=0,
                         split=0, pdl=None):
    n = weight.shape[0] // 2 if activation == "swiglu" else weight.shape[0]
    return x.new_empty(x.shape[0], n)
