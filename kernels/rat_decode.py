"""RAT decode step in one kernel (the fast path of ratpt.ops.rat_decode_mixing).

Per (sequence, head): the gate and the running-state update (reset at a chunk start), the own
score q·k̃ (RoPE cancels: q and k̃ share the chunk angle) seeding an online softmax over the
summary slots j < c (q rotated by the chunk index c), the output row (times the layer's output
gate sigmoid(z), if given), and the write of the rotated running k̃ and ṽ into slot c. The loop
bound c is read on the device, so the launch has static shapes and no host synchronisation: it
can be captured in a CUDA graph.

At small batch one program per (sequence, head) leaves most SMs idle (batch 1 of RAT-1.3B: 16
programs), each walking up to 256 slots. There the slots are cut in runs, one program each
(flash-decoding): the first program also owns the running state, the own term and slot c, which
no program of the step reads (they see j < c), and attention decode's merge_splits combines the
runs' partial softmaxes and applies the gate.

Bytes per step: the visible summaries (2·c·d per head, model dtype) dominate; at B 32, H 16,
d 128, c 256 (T 4096, L 16) that is 64 MiB, ≈ 16 µs of H200 bandwidth.
"""
import math

import torch
import triton
import triton.language as tl

from .attention_decode import merge_into, softmax_over_slots, split_runs, split_scratch
from .common import (LOG2E, after_predecessor, dependent_launch, ieee_dots, interpreting, join_halves,
                     launch_options, sm_count)
from .rat_fwd import inverse_frequencies


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, f_ptr, bias_ptr, inv_freq_ptr, pos_ptr,
                   sk_ptr, sv_ptr, rk_ptr, rv_ptr, y_ptr, z_ptr, o_ptr, m_ptr, l_ptr,
                   sq_b, sk_b, sv_b, sf_b, sy_b, srk_b, srv_b, sz_b,
                   ssk_b, ssk_h, ssk_c, ssv_b, ssv_h, ssv_c,
                   capacity, split_len, qk_scale,
                   H: tl.constexpr, G: tl.constexpr, L: tl.constexpr, HALF: tl.constexpr, BC: tl.constexpr,
                   GATE: tl.constexpr, SPLITS: tl.constexpr, DOTS: tl.constexpr, F32: tl.constexpr,
                   PDL: tl.constexpr):
    b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    D_HEAD: tl.constexpr = 2 * HALF
    b64 = b.to(tl.int64)
    cols = tl.arange(0, HALF)
    full = tl.arange(0, D_HEAD)
    kc = (h % G) * D_HEAD + cols
    vc = h * D_HEAD + cols
    inv_freq = tl.load(inv_freq_ptr + cols)  # a constant table: read before the inputs are ready
    after_predecessor(PDL)
    pos = tl.load(pos_ptr + b)
    chunk = pos // L
    q1 = tl.load(q_ptr + b64 * sq_b + kc).to(tl.float32)
    q2 = tl.load(q_ptr + b64 * sq_b + kc + HALF).to(tl.float32)
    angle = chunk.to(tl.float32) * inv_freq
    cos, sin = tl.cos(angle), tl.sin(angle)
    sk_head = sk_ptr + b64 * ssk_b + h * ssk_h
    sv_head = sv_ptr + b64 * ssv_b + h * ssv_h
    lo = split * split_len  # this program's run of summary slots starts here
    if split == 0:  # the own running state: updated, seeding the softmax, written to slot c
        m, l_sum, acc = _own_state(q1, q2, k_ptr, v_ptr, f_ptr, bias_ptr, rk_ptr, rv_ptr, sk_head, sv_head,
                                   b64, kc, vc, cols, pos, chunk, cos, sin, capacity,
                                   sk_b, sv_b, sf_b, srk_b, srv_b, ssk_c, ssv_c, qk_scale, L, HALF)
    else:
        m = tl.full((), float("-inf"), tl.float32)
        l_sum = tl.zeros((), tl.float32)
        acc = tl.zeros((D_HEAD,), tl.float32)
    # --- online softmax over this program's run of the visible summary slots j < c (q rotated by c)
    qr = tl.reshape(join_halves((q1 * cos - q2 * sin)[None, :], (q2 * cos + q1 * sin)[None, :], 1, HALF), (D_HEAD,))
    m, l_sum, acc = softmax_over_slots(qr, sk_head, sv_head, ssk_c, ssv_c, lo,
                                       tl.minimum(lo + split_len, tl.minimum(chunk, capacity)), m, l_sum, acc,
                                       qk_scale, D_HEAD, BC, DOTS, F32)
    if SPLITS == 1:
        y = acc / l_sum
        if GATE:  # the layer's output gate sigmoid(z)
            y = y * tl.sigmoid(tl.load(z_ptr + b64 * sz_b + h * D_HEAD + full).to(tl.float32))
        tl.store(y_ptr + b64 * sy_b + h * D_HEAD + full, y.to(y_ptr.dtype.element_ty))
    else:  # this run's partial, for merge_splits
        part = (b64 * H + h) * SPLITS + split
        tl.store(o_ptr + part * D_HEAD + full, acc)
        tl.store(m_ptr + part, m)
        tl.store(l_ptr + part, l_sum)


@triton.jit
def _own_state(q1, q2, k_ptr, v_ptr, f_ptr, bias_ptr, rk_ptr, rv_ptr, sk_head, sv_head,
               b64, kc, vc, cols, pos, chunk, cos, sin, capacity,
               sk_b, sv_b, sf_b, srk_b, srv_b, ssk_c, ssv_c, qk_scale, L: tl.constexpr, HALF: tl.constexpr):
    """The gate and the running-state update (reset at a chunk start), written back in place (fp32); the
    own score q·k̃ (RoPE cancels: q and k̃ share the chunk angle) as the softmax's first term (max, sum,
    accumulator); and slot c := the rotated running state, visible to later chunks once c is complete."""
    carry = pos % L != 0
    rk = rk_ptr + b64 * srk_b + vc
    rv = rv_ptr + b64 * srv_b + vc
    g1 = tl.sigmoid(tl.load(f_ptr + b64 * sf_b + vc).to(tl.float32) + tl.load(bias_ptr + vc).to(tl.float32))
    g2 = tl.sigmoid(tl.load(f_ptr + b64 * sf_b + vc + HALF).to(tl.float32)
                    + tl.load(bias_ptr + vc + HALF).to(tl.float32))
    keep1 = tl.where(carry, g1, 0.0)
    keep2 = tl.where(carry, g2, 0.0)
    ks1 = keep1 * tl.load(rk).to(tl.float32) + (1 - g1) * tl.load(k_ptr + b64 * sk_b + kc).to(tl.float32)
    ks2 = keep2 * tl.load(rk + HALF).to(tl.float32) + (1 - g2) * tl.load(k_ptr + b64 * sk_b + kc + HALF).to(tl.float32)
    vs1 = keep1 * tl.load(rv).to(tl.float32) + (1 - g1) * tl.load(v_ptr + b64 * sv_b + vc).to(tl.float32)
    vs2 = keep2 * tl.load(rv + HALF).to(tl.float32) + (1 - g2) * tl.load(v_ptr + b64 * sv_b + vc + HALF).to(tl.float32)
    tl.store(rk, ks1.to(rk_ptr.dtype.element_ty))
    tl.store(rk + HALF, ks2.to(rk_ptr.dtype.element_ty))
    tl.store(rv, vs1.to(rv_ptr.dtype.element_ty))
    tl.store(rv + HALF, vs2.to(rv_ptr.dtype.element_ty))
    writable = (cols * 0 + chunk) < capacity
    slot_k = sk_head + chunk * ssk_c + cols
    slot_v = sv_head + chunk * ssv_c + cols
    tl.store(slot_k, (ks1 * cos - ks2 * sin).to(sk_head.dtype.element_ty), mask=writable)
    tl.store(slot_k + HALF, (ks2 * cos + ks1 * sin).to(sk_head.dtype.element_ty), mask=writable)
    tl.store(slot_v, vs1.to(sv_head.dtype.element_ty), mask=writable)
    tl.store(slot_v + HALF, vs2.to(sv_head.dtype.element_ty), mask=writable)
    m = (tl.sum(q1 * ks1, 0) + tl.sum(q2 * ks2, 0)) * qk_scale
    return m, m * 0.0 + 1.0, tl.reshape(join_halves(vs1[None, :], vs2[None, :], 1, HALF), (2 * HALF,))


def default_launch(batch_heads: int, capacity: int, device: torch.device) -> tuple[int, int, int]:
    """(summary slots per loop step, warps, programs per (sequence, head)). Where one program per (sequence,
    head) fills the SMs: 32 slots and 2 warps (the batch-2048 sweep, benchmarks/results/decode_sweep.json).
    Where it leaves SMs idle (batch 1 of RAT-1.3B: 16 programs on 132 SMs), the slots are cut in runs of at
    least one 64-slot loop step, 4 warps each, as many as give two programs per SM: on one H200 at batch 1
    and position 3584 a layer's kernel takes 6.7 µs in 4 runs against 26 µs whole (profile_decode.py --sweep,
    benchmarks/results/decode_sweep_b1.json)."""
    if device.type != "cuda" or batch_heads >= sm_count(device.index):
        return 32, 2, 1
    wanted = triton.next_power_of_2(triton.cdiv(2 * sm_count(device.index), batch_heads))
    return 64, 4, max(1, min(wanted, capacity // 64))


@torch.library.custom_op("ratpt::rat_decode",
                         mutates_args=("summary_k", "summary_v", "running_k", "running_v"))
def rat_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, gate_bias: torch.Tensor,
               summary_k: torch.Tensor, summary_v: torch.Tensor, running_k: torch.Tensor, running_v: torch.Tensor,
               positions: torch.Tensor, chunk_size: int, head_dim: int, rope_base: float,
               gate: torch.Tensor | None = None, slots: int = 0, warps: int = 0, stages: int = 2,
               splits: int = 0, pdl: bool | None = None, dots: bool = True) -> torch.Tensor:
    """Same contract as ratpt.ops.rat_decode_mixing (caches updated in place, y returned).

    A custom op that declares its in-place cache writes, so that torch.compile of a whole decode
    step keeps the launch as one opaque call and fuses the glue around it.
    slots, warps, stages: the launch (summary slots per loop step); splits: programs per (sequence,
    head), each over a run of the slots, merged by a second launch; slots, warps and splits 0 for
    default_launch's (benchmarks/profile_decode.py --sweep measures them). pdl: launch as programmatic
    dependents (None: common.dependent_launch's answer for the device); dots: the summary products as
    tensor-core dots (attention_decode.softmax_over_slots), else fp32 FMAs: on one H100 at position 3100,
    5.56 against 6.90 µs a layer at batch 1 (the default split launch) and 46.3 against 47.0 at batch 64
    (one program per head), benchmarks/results/decode_sweep_h100.json."""
    B, D = v.shape
    H, G, d = D // head_dim, q.shape[-1] // head_dim, head_dim
    for name, t in {"q": q, "k": k, "v": v, "f": f, "summary_k": summary_k, "summary_v": summary_v,
                    "running_k": running_k, "running_v": running_v, "gate": v if gate is None else gate}.items():
        if t.stride(-1) != 1:
            raise ValueError(f"rat_decode needs {name} contiguous in its last dim, got strides {t.stride()}")
    capacity = summary_k.shape[2]
    slots, warps, splits = (given or default for given, default in
                            zip((slots, warps, splits), default_launch(B * H, capacity, v.device)))
    slots = 16 if interpreting() else slots
    split_len, splits = split_runs(max(capacity, 1), splits, slots)
    y = torch.empty(B, D, device=v.device, dtype=v.dtype)
    partial, stats = split_scratch(B * H, splits, d, v.device)
    z = v if gate is None or splits > 1 else gate
    pdl = dependent_launch(v.device) if pdl is None else pdl
    _decode_kernel[(B, H, splits)](
        q, k, v, f, gate_bias, inverse_frequencies(d, rope_base, v.device), positions,
        summary_k, summary_v, running_k, running_v, y, z, partial, stats[0], stats[1],
        q.stride(0), k.stride(0), v.stride(0), f.stride(0), y.stride(0), running_k.stride(0), running_v.stride(0),
        z.stride(0), *summary_k.stride()[:3], *summary_v.stride()[:3],
        capacity, split_len, LOG2E / math.sqrt(d),
        H=H, G=G, L=chunk_size, HALF=d // 2, BC=slots, GATE=gate is not None and splits == 1, SPLITS=splits,
        DOTS=dots, F32=ieee_dots(q), PDL=pdl, num_warps=warps, num_stages=stages, **launch_options(pdl))
    if splits > 1:
        merge_into(y, partial, stats, H, splits, (y.stride(0), d), pdl, gate)
    return y


@rat_decode.register_fake
def _rat_decode_shape(q, k, v, *rest):
    return v.new_empty(v.shape)
