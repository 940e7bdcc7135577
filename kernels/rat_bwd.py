"""RAT sequence mixing, backward: the fused gradients of kernels/rat_fwd.py.

With P the softmax weights over [summaries j < c, own state], Δ = Σ_d dy·y per row and
dS = P ⊙ (dP − Δ), dP = dy·values:
1. `_delta_kernel`: Δ [B, H, T] (fp32).
2. `_summary_grad_kernel`: per (block of summaries, batch, head), a loop over the later query
   rows: dKs = scale Σ_t dS q_rot, dVs = Σ_t P dy (fp32, [B, H, T//L, d], still rotated).
3. `_query_grad_kernel`: per (block of whole chunks, batch, head): dq through the summaries and
   the own score; the direct gradients of k̃, ṽ (own score and own value) plus, at each chunk
   end, the summary gradients rotated back by the chunk index; the reverse recurrence inside
   chunks, λ[t] = dY[t] + g[t+1] λ[t+1]; then dk, dv = (1 − g) λ and the gate gradient
   df = (1 − g) Σ λ ⊙ (state − input) (this is ∂/∂g · g(1−g) without a division by g).
   dq, dk are written per head [B, T, H·d] and summed over each group's heads afterwards;
   the gate-bias gradient as per-program partial sums.
"""
import math

import torch
import triton
import triton.language as tl

from kernels.common import LOG2E, chunk_states, dot, interpreting, reverse_chunk_states, rope_cos_sin
from kernels.rat_fwd import block_sizes, inverse_frequencies, num_warps


@triton.jit
def _delta_kernel(y_ptr, dy_ptr, delta_ptr, T, H: tl.constexpr, D_HEAD: tl.constexpr, BQ: tl.constexpr):
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    rows = pid_t * BQ + tl.arange(0, BQ)
    cols = tl.arange(0, D_HEAD)
    mask = (rows < T)[:, None]
    off = (b.to(tl.int64) * T + rows[:, None]) * (H * D_HEAD) + h * D_HEAD + cols[None, :]
    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * T + rows, tl.sum(y * dy, 1), mask=rows < T)


@triton.jit
def _summary_grad_kernel(q_ptr, dy_ptr, lse_ptr, delta_ptr, inv_freq_ptr, ks_ptr, vs_ptr, dks_ptr, dvs_ptr,
                         sq_b, sq_t, T, C, qk_scale, scale,
                         H: tl.constexpr, G: tl.constexpr, L: tl.constexpr, HALF: tl.constexpr,
                         BQ: tl.constexpr, BC: tl.constexpr, F32: tl.constexpr):
    pid_c, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    D_HEAD: tl.constexpr = 2 * HALF
    DT = ks_ptr.dtype.element_ty
    j = pid_c * BC + tl.arange(0, BC)
    cols = tl.arange(0, HALF)
    jmask = (j < C)[:, None]
    sp = pid_bh.to(tl.int64) * C * D_HEAD + j[:, None] * D_HEAD + cols[None, :]
    kb1 = tl.load(ks_ptr + sp, mask=jmask, other=0.0)
    kb2 = tl.load(ks_ptr + sp + HALF, mask=jmask, other=0.0)
    vb1 = tl.load(vs_ptr + sp, mask=jmask, other=0.0)
    vb2 = tl.load(vs_ptr + sp + HALF, mask=jmask, other=0.0)
    dk1 = tl.zeros([BC, HALF], tl.float32)
    dk2 = tl.zeros([BC, HALF], tl.float32)
    dv1 = tl.zeros([BC, HALF], tl.float32)
    dv2 = tl.zeros([BC, HALF], tl.float32)
    inv_freq = tl.load(inv_freq_ptr + cols)
    b64 = b.to(tl.int64)
    kc = (h % G) * D_HEAD + cols
    yc = h * D_HEAD + cols
    t_start = ((pid_c * BC + 1) * L) // BQ * BQ  # first row block that sees summary pid_c*BC
    t_masked = (pid_c * BC + BC + 1) * L  # rows from here on see the whole block
    for t0 in range(t_start, T, BQ):
        rows = t0 + tl.arange(0, BQ)
        rmask = rows < T
        chunk = rows // L
        q_rows = q_ptr + b64 * sq_b + rows[:, None] * sq_t
        q1 = tl.load(q_rows + kc[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_rows + kc[None, :] + HALF, mask=rmask[:, None], other=0.0).to(tl.float32)
        cos, sin = rope_cos_sin(chunk, inv_freq)
        qr1 = (q1 * cos - q2 * sin).to(DT)
        qr2 = (q2 * cos + q1 * sin).to(DT)
        lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
        delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
        st = (dot(kb1, tl.trans(qr1), DT, F32) + dot(kb2, tl.trans(qr2), DT, F32)) * qk_scale  # [BC, BQ]
        pt = tl.exp2(st - lse[None, :])
        if t0 < t_masked:
            pt = tl.where((j[:, None] < chunk[None, :]) & rmask[None, :], pt, 0.0)
        else:
            pt = tl.where(rmask[None, :], pt, 0.0)
        dy_rows = dy_ptr + (b64 * T + rows[:, None]) * (H * D_HEAD) + yc[None, :]
        dy1 = tl.load(dy_rows, mask=rmask[:, None], other=0.0)
        dy2 = tl.load(dy_rows + HALF, mask=rmask[:, None], other=0.0)
        dpt = dot(vb1, tl.trans(dy1), DT, F32) + dot(vb2, tl.trans(dy2), DT, F32)
        dst = pt * (dpt - delta[None, :])
        dk1 += dot(dst, qr1, DT, F32)
        dk2 += dot(dst, qr2, DT, F32)
        dv1 += dot(pt, dy1, DT, F32)
        dv2 += dot(pt, dy2, DT, F32)
    tl.store(dks_ptr + sp, dk1 * scale, mask=jmask)
    tl.store(dks_ptr + sp + HALF, dk2 * scale, mask=jmask)
    tl.store(dvs_ptr + sp, dv1, mask=jmask)
    tl.store(dvs_ptr + sp + HALF, dv2, mask=jmask)


@triton.jit
def _query_grad_kernel(q_ptr, k_ptr, v_ptr, f_ptr, bias_ptr, inv_freq_ptr, ks_ptr, vs_ptr, dy_ptr, lse_ptr,
                       delta_ptr, dks_ptr, dvs_ptr, dq_ptr, dk_ptr, dv_ptr, df_ptr, dbias_ptr,
                       sq_b, sq_t, sk_b, sk_t, sv_b, sv_t, sf_b, sf_t,
                       B, T, C, qk_scale, scale,
                       H: tl.constexpr, G: tl.constexpr, L: tl.constexpr, HALF: tl.constexpr,
                       BQ: tl.constexpr, BC: tl.constexpr, F32: tl.constexpr):
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    D_HEAD: tl.constexpr = 2 * HALF
    DT = ks_ptr.dtype.element_ty
    t0 = pid_t * BQ
    rows = t0 + tl.arange(0, BQ)
    cols = tl.arange(0, HALF)
    rmask = rows < T
    mask = rmask[:, None]
    chunk = rows // L
    b64 = b.to(tl.int64)
    kc = (h % G) * D_HEAD + cols
    vc = h * D_HEAD + cols
    q_rows = q_ptr + b64 * sq_b + rows[:, None] * sq_t
    out_rows = (b64 * T + rows[:, None]) * (H * D_HEAD) + vc[None, :]  # [B, T, H·d] tensors
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    dy1 = tl.load(dy_ptr + out_rows, mask=mask, other=0.0)
    dy2 = tl.load(dy_ptr + out_rows + HALF, mask=mask, other=0.0)
    q1 = tl.load(q_rows + kc[None, :], mask=mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_rows + kc[None, :] + HALF, mask=mask, other=0.0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + cols)
    cos, sin = rope_cos_sin(chunk, inv_freq)
    qr1 = ((q1 * cos - q2 * sin) * qk_scale).to(DT)
    qr2 = ((q2 * cos + q1 * sin) * qk_scale).to(DT)
    # --- dq through the summaries (rotated space)
    dqr1 = tl.zeros([BQ, HALF], tl.float32)
    dqr2 = tl.zeros([BQ, HALF], tl.float32)
    c_first = t0 // L
    n_visible = tl.minimum(t0 + BQ - 1, T - 1) // L
    summary = pid_bh.to(tl.int64) * C * D_HEAD
    jr = tl.arange(0, BC)
    for j0 in range(0, n_visible, BC):
        j = j0 + jr
        jmask = (j < n_visible)[:, None]
        sp = summary + j[:, None] * D_HEAD + cols[None, :]
        kb1 = tl.load(ks_ptr + sp, mask=jmask, other=0.0)
        kb2 = tl.load(ks_ptr + sp + HALF, mask=jmask, other=0.0)
        s = dot(qr1, tl.trans(kb1), DT, F32) + dot(qr2, tl.trans(kb2), DT, F32)
        p = tl.exp2(s - lse[:, None])
        if j0 + BC > c_first:
            p = tl.where(j[None, :] < chunk[:, None], p, 0.0)
        vb1 = tl.load(vs_ptr + sp, mask=jmask, other=0.0)
        vb2 = tl.load(vs_ptr + sp + HALF, mask=jmask, other=0.0)
        dp = dot(dy1, tl.trans(vb1), DT, F32) + dot(dy2, tl.trans(vb2), DT, F32)
        ds = p * (dp - delta[:, None])
        dqr1 += dot(ds, kb1, DT, F32)
        dqr2 += dot(ds, kb2, DT, F32)
    # --- the own state: recompute the recurrences, then its score's and value's gradients
    first = rows % L == 0
    f_rows = f_ptr + b64 * sf_b + rows[:, None] * sf_t
    k_rows = k_ptr + b64 * sk_b + rows[:, None] * sk_t
    v_rows = v_ptr + b64 * sv_b + rows[:, None] * sv_t
    bias1 = tl.load(bias_ptr + vc).to(tl.float32)
    bias2 = tl.load(bias_ptr + vc + HALF).to(tl.float32)
    g1, k1, v1, ks1, vs1 = chunk_states(f_rows + vc[None, :], k_rows + kc[None, :], v_rows + vc[None, :],
                                        bias1, first, mask)
    g2, k2, v2, ks2, vs2 = chunk_states(f_rows + vc[None, :] + HALF, k_rows + kc[None, :] + HALF,
                                        v_rows + vc[None, :] + HALF, bias2, first, mask)
    dy1 = dy1.to(tl.float32)
    dy2 = dy2.to(tl.float32)
    p_own = tl.exp2((tl.sum(q1 * ks1, 1) + tl.sum(q2 * ks2, 1)) * qk_scale - lse)
    ds_own = p_own * (tl.sum(dy1 * vs1, 1) + tl.sum(dy2 * vs2, 1) - delta) * scale
    p_own = tl.where(rmask, p_own, 0.0)
    ds_own = tl.where(rmask, ds_own, 0.0)
    dq1 = (dqr1 * cos + dqr2 * sin) * scale + ds_own[:, None] * ks1
    dq2 = (dqr2 * cos - dqr1 * sin) * scale + ds_own[:, None] * ks2
    DQT = dq_ptr.dtype.element_ty
    tl.store(dq_ptr + out_rows, dq1.to(DQT), mask=mask)
    tl.store(dq_ptr + out_rows + HALF, dq2.to(DQT), mask=mask)
    # --- direct gradients of k̃, ṽ; the summary gradients enter at chunk ends
    end = (rows % L == L - 1) & rmask
    sp = summary + chunk[:, None] * D_HEAD + cols[None, :]
    emask = end[:, None]
    dsk1 = tl.load(dks_ptr + sp, mask=emask, other=0.0)
    dsk2 = tl.load(dks_ptr + sp + HALF, mask=emask, other=0.0)
    dks1 = ds_own[:, None] * q1 + dsk1 * cos + dsk2 * sin
    dks2 = ds_own[:, None] * q2 + dsk2 * cos - dsk1 * sin
    dvs1 = p_own[:, None] * dy1 + tl.load(dvs_ptr + sp, mask=emask, other=0.0)
    dvs2 = p_own[:, None] * dy2 + tl.load(dvs_ptr + sp + HALF, mask=emask, other=0.0)
    # --- reverse recurrence inside chunks
    last_or_out = (rows % L == L - 1) | (rows + 1 >= T)
    lk1, lv1 = reverse_chunk_states(f_rows + sf_t + vc[None, :], bias1, last_or_out, mask, dks1, dvs1)
    lk2, lv2 = reverse_chunk_states(f_rows + sf_t + vc[None, :] + HALF, bias2, last_or_out, mask, dks2, dvs2)
    df1 = (1 - g1) * (lk1 * (ks1 - k1) + lv1 * (vs1 - v1))
    df2 = (1 - g2) * (lk2 * (ks2 - k2) + lv2 * (vs2 - v2))
    DKT = dk_ptr.dtype.element_ty
    tl.store(dk_ptr + out_rows, ((1 - g1) * lk1).to(DKT), mask=mask)
    tl.store(dk_ptr + out_rows + HALF, ((1 - g2) * lk2).to(DKT), mask=mask)
    DVT = dv_ptr.dtype.element_ty
    tl.store(dv_ptr + out_rows, ((1 - g1) * lv1).to(DVT), mask=mask)
    tl.store(dv_ptr + out_rows + HALF, ((1 - g2) * lv2).to(DVT), mask=mask)
    DFT = df_ptr.dtype.element_ty
    tl.store(df_ptr + out_rows, df1.to(DFT), mask=mask)
    tl.store(df_ptr + out_rows + HALF, df2.to(DFT), mask=mask)
    part = (pid_t.to(tl.int64) * B + b) * (H * D_HEAD) + vc
    tl.store(dbias_ptr + part, tl.sum(tl.where(mask, df1, 0.0), 0))
    tl.store(dbias_ptr + part + HALF, tl.sum(tl.where(mask, df2, 0.0), 0))


def rat_backward(dy, q, k, v, f, gate_bias, y, lse, ks, vs, chunk_size: int, head_dim: int, rope_base: float):
    """Gradients (dq, dk, dv, df, dgate_bias) of rat_forward's y."""
    B, T, D = v.shape
    H, G, L, d = D // head_dim, q.shape[-1] // head_dim, chunk_size, head_dim
    C = ks.shape[2]
    dy = dy.contiguous()
    f32 = v.dtype == torch.float32 or interpreting()
    inv_freq = inverse_frequencies(d, rope_base, v.device)
    scale = 1.0 / math.sqrt(d)
    warps = num_warps(d)
    bq, bc = block_sizes(L, v.dtype)
    delta = torch.empty(B, H, T, device=v.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(T, bq), B * H)](y, dy, delta, T, H=H, D_HEAD=d, BQ=bq, num_warps=warps)
    dks = torch.zeros(B, H, C, d, device=v.device, dtype=torch.float32)
    dvs = torch.zeros_like(dks)
    if C:
        _summary_grad_kernel[(triton.cdiv(C, bc), B * H)](
            q, dy, lse, delta, inv_freq, ks, vs, dks, dvs, q.stride(0), q.stride(1), T, C,
            LOG2E * scale, scale, H=H, G=G, L=L, HALF=d // 2, BQ=bq, BC=bc, F32=f32, num_warps=warps)
    dq_heads = torch.empty(B, T, D, device=v.device, dtype=q.dtype)
    dk_heads = torch.empty(B, T, D, device=v.device, dtype=k.dtype)
    dv = torch.empty(B, T, D, device=v.device, dtype=v.dtype)
    df = torch.empty(B, T, D, device=v.device, dtype=f.dtype)
    n_blocks = triton.cdiv(T, bq)
    dbias = torch.empty(n_blocks * B, D, device=v.device, dtype=torch.float32)
    _query_grad_kernel[(n_blocks, B * H)](
        q, k, v, f, gate_bias, inv_freq, ks, vs, dy, lse, delta, dks, dvs, dq_heads, dk_heads, dv, df, dbias,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), f.stride(0), f.stride(1),
        B, T, max(C, 1), LOG2E * scale, scale, H=H, G=G, L=L, HALF=d // 2, BQ=bq, BC=bc, F32=f32,
        num_warps=warps)
    dq = dq_heads.view(B, T, H // G, G * d).sum(2, dtype=torch.float32).to(q.dtype)
    dk = dk_heads.view(B, T, H // G, G * d).sum(2, dtype=torch.float32).to(k.dtype)
    return dq, dk, dv, df, dbias.sum(0).to(gate_bias.dtype)
