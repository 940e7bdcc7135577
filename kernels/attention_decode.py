"""Length-aware attention decode (the fast path of ratpt.ops.attention_decode): one query per
(sequence, head) against only the cache slots that hold tokens.

Split-K over the slots (flash-decoding): program (b·H + h, s) runs an online softmax over slots
[s·SPLIT, min((s + 1)·SPLIT, n_b)) in blocks of BLOCK_N, n_b = visible[b] read on the device; a
split starting at or past n_b reads nothing and leaves an empty partial (max −inf, sum 0). With one
split the program writes the output itself, else a second kernel (merge_splits, shared with RAT's
decode) merges the splits' partials. The grid and the split count depend on shapes only: the launches
are static, never wait for the host, and can be captured in a CUDA graph.

The products: each block's scores (q · kᵀ) and weighted values (p · v) are tensor-core dots of a
16-row tile whose first row is the query (the others zero, so the tile's column sums are that row): no
fp32 copy of the k and v blocks, fewer instructions per byte read; p enters its dot rounded to the cache
dtype (as FlashAttention's P · V). Without `dots` they are fp32 FMAs and sums on the CUDA cores.

Bytes per step: the visible (k, v) rows, 2·n_b·d values per head (in bf16 at B 64, H 16, d 128 and
3584 visible slots, 1.88 GB per layer).
"""
import math

import torch
import triton
import triton.language as tl

from .common import (LOG2E, after_predecessor, dependent_launch, dot, ieee_dots, interpreting, launch_options,
                     sm_count)

DOT_ROWS = tl.constexpr(16)  # a tensor-core dot's fewest rows: the query's tile with `dots`


@triton.jit
def softmax_over_slots(q, k_head, v_head, sk_s, sv_s, lo, hi, m, l_sum, acc, qk_scale,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, DOTS: tl.constexpr, F32: tl.constexpr):
    """One query's online softmax carried on from (max m, sum l_sum, unnormalised output acc [D], fp32)
    over one head's cache rows [lo, hi), BLOCK_N at a time; returns the new (m, l_sum, acc). q [D] is
    unscaled (the scores are q · k · qk_scale, in log2 units). Attention's decode runs it over its key and
    value slots, RAT's over its chunk summaries."""
    cols = tl.arange(0, D)
    rows = tl.arange(0, BLOCK_N)
    first = (tl.arange(0, DOT_ROWS) == 0)[:, None]
    if DOTS:
        q_tile = tl.where(first, q[None, :], 0.0).to(k_head.dtype.element_ty)
    else:
        q_row = q.to(tl.float32) * qk_scale
    for start in range(lo, hi, BLOCK_N):
        j = start + rows
        valid = j < hi
        kb = tl.load(k_head + j[:, None].to(tl.int64) * sk_s + cols[None, :], mask=valid[:, None], other=0.0)
        vb = tl.load(v_head + j[:, None].to(tl.int64) * sv_s + cols[None, :], mask=valid[:, None], other=0.0)
        if DOTS:
            scores = tl.sum(dot(q_tile, tl.trans(kb), kb.dtype, F32), 0) * qk_scale
        else:
            scores = tl.sum(kb.to(tl.float32) * q_row[None, :], 1)
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 0)
        if DOTS:
            weighted = tl.sum(dot(tl.where(first, p[None, :], 0.0), vb, vb.dtype, F32), 0)
        else:
            weighted = tl.sum(p[:, None] * vb.to(tl.float32), 0)
        acc = acc * alpha + weighted
        m = m_new
    return m, l_sum, acc


@triton.jit
def _attention_decode_split(q_ptr, k_ptr, v_ptr, n_ptr, y_ptr, o_ptr, m_ptr, l_ptr,
                  sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sy_b, sy_h, qk_scale,
                  H: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, SPLITS: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOTS: tl.constexpr, F32: tl.constexpr, PDL: tl.constexpr):
    bh, s = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    b64 = b.to(tl.int64)
    cols = tl.arange(0, D)
    after_predecessor(PDL)
    q = tl.load(q_ptr + b64 * sq_b + h * sq_h + cols)
    lo = s * SPLIT
    m, l_sum, acc = softmax_over_slots(q, k_ptr + b64 * sk_b + h * sk_h, v_ptr + b64 * sv_b + h * sv_h, sk_s, sv_s,
                                       lo, tl.minimum(lo + SPLIT, tl.load(n_ptr + b).to(tl.int32)),
                                       tl.full((), float("-inf"), tl.float32), tl.zeros((), tl.float32),
                                       tl.zeros((D,), tl.float32), qk_scale, D, BLOCK_N, DOTS, F32)
    if SPLITS == 1:
        tl.store(y_ptr + b64 * sy_b + h * sy_h + cols, (acc / l_sum).to(y_ptr.dtype.element_ty))
    else:
        part = bh.to(tl.int64) * SPLITS + s
        tl.store(o_ptr + part * D + cols, acc)
        tl.store(m_ptr + part, m)
        tl.store(l_ptr + part, l_sum)


@triton.jit
def merge_splits(o_ptr, m_ptr, l_ptr, y_ptr, z_ptr, sy_b, sy_h, sz_b, sz_h,
                 H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                 GATE: tl.constexpr, PDL: tl.constexpr):
    """y = the softmax over every split of one (sequence, head), from each split's fp32 partial (unnormalised
    output, max, sum), times sigmoid(z) when GATE (RAT's output gate). Split 0 is never empty (attention:
    it holds slot 0; RAT: it holds the own running state), so the max is finite."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    after_predecessor(PDL)
    splits = tl.arange(0, SPLITS_P2)
    used = splits < SPLITS
    part = bh.to(tl.int64) * SPLITS + splits
    m = tl.load(m_ptr + part, mask=used, other=float("-inf"))
    weight = tl.exp2(m - tl.max(m, 0))
    l_sum = tl.sum(weight * tl.load(l_ptr + part, mask=used, other=0.0), 0)
    cols = tl.arange(0, D)
    o = tl.load(o_ptr + part[:, None] * D + cols[None, :], mask=used[:, None], other=0.0)
    y = tl.sum(weight[:, None] * o, 0) / l_sum
    if GATE:
        y = y * tl.sigmoid(tl.load(z_ptr + b.to(tl.int64) * sz_b + h * sz_h + cols).to(tl.float32))
    tl.store(y_ptr + b.to(tl.int64) * sy_b + h * sy_h + cols, y.to(y_ptr.dtype.element_ty))


def split_runs(slots: int, splits: int, block: int) -> tuple[int, int]:
    """(slots per split, splits) for `slots` cut in at most `splits` runs of whole blocks, none empty
    of slots (a run may still hold no visible token: the kernels leave an empty partial there)."""
    split = triton.cdiv(triton.cdiv(slots, splits), block) * block
    return split, triton.cdiv(slots, split)


def split_scratch(batch_heads: int, splits: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial outputs [B·H·splits, d] and (max, sum) [2, B·H·splits] of a split launch; one split
    writes y directly, so it gets a one-row placeholder."""
    parts = batch_heads * splits if splits > 1 else 1
    return (torch.empty(parts, d, device=device, dtype=torch.float32),
            torch.empty(2, parts, device=device, dtype=torch.float32))


def merge_into(y: torch.Tensor, partial: torch.Tensor, stats: torch.Tensor, heads: int, splits: int,
               sy: tuple[int, int], pdl: bool, gate: torch.Tensor | None = None) -> None:
    """Launch merge_splits over a split launch's partials into y (strides sy per sequence and head), gated
    by sigmoid(gate) ([B, H·d], as the layer's output gate) if given; as a programmatic dependent if pdl."""
    d = partial.shape[1]
    sz = (0, 0) if gate is None else (gate.stride(0), d)
    merge_splits[(partial.shape[0] // splits,)](
        partial, stats[0], stats[1], y, y if gate is None else gate, *sy, *sz, H=heads, D=d,
        SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), GATE=gate is not None, PDL=pdl, num_warps=4,
        **launch_options(pdl))


def default_splits(batch_heads: int, slots: int, block: int, device: torch.device) -> int:
    """Splits per (sequence, head): a power of two giving the grid at least 16 programs per SM (a short
    tail wave), each split at least two blocks of slots (benchmarks/attention_decode.py measures them)."""
    if device.type != "cuda":
        return 1
    return max(1, min(triton.next_power_of_2(triton.cdiv(16 * sm_count(device.index), batch_heads)),
                      slots // (2 * block)))


@torch.library.custom_op("ratpt::attention_decode", mutates_args=())
def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, visible: torch.Tensor,
                     splits: int | None = None, block: int = 64, warps: int = 4, stages: int = 3,
                     pdl: bool | None = None, dots: bool = True) -> torch.Tensor:
    """Same contract as ratpt.ops.attention_decode: y [B, H, 1, d] in q's dtype.

    A custom op, so that torch.compile of a decode step keeps both launches as one opaque call.
    splits, block, warps, stages: the launch (None: default_splits); pdl: launch as programmatic
    dependents (None: common.dependent_launch's answer for q's device); dots: tensor-core products, else FMAs.
    The defaults are the fastest launch of benchmarks/attention_decode.py's sweep on an H100 at batch 64,
    position 3100 (0.601 ms a layer, 2.70 TB/s; FMAs at 2 stages, the default before, 0.627)."""
    B, H, _, d = q.shape
    S = k_cache.shape[2]
    for name, t in {"q": q, "k_cache": k_cache, "v_cache": v_cache}.items():
        if t.stride(-1) != 1:
            raise ValueError(f"attention_decode needs {name} contiguous in its last dim, got strides {t.stride()}")
    block = 16 if interpreting() else block
    splits = splits or default_splits(B * H, S, block, q.device)
    split, splits = split_runs(S, splits, block)
    y = torch.empty(B, H, 1, d, device=q.device, dtype=q.dtype)
    partial, stats = split_scratch(B * H, splits, d, q.device)
    pdl = dependent_launch(q.device) if pdl is None else pdl
    _attention_decode_split[(B * H, splits)](
        q, k_cache, v_cache, visible, y, partial, stats[0], stats[1],
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], y.stride(0), y.stride(1),
        LOG2E / math.sqrt(d), H=H, D=d, SPLIT=split, SPLITS=splits, BLOCK_N=block, DOTS=dots,
        F32=ieee_dots(q), PDL=pdl, num_warps=warps,
        num_stages=stages, **launch_options(pdl))
    if splits > 1:
        merge_into(y, partial, stats, H, splits, (y.stride(0), y.stride(1)), pdl)
    return y


@attention_decode.register_fake
def _attention_decode_shape(q, k_cache, v_cache, visible, *launch):
    return torch.empty_like(q)
