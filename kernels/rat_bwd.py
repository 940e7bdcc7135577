"""RAT sequence mixing, backward: the fused gradients of kernels/rat_fwd.py.

With P the softmax weights over [summaries j < c, own state], Δ = Σ_d dy·y per row and
dS = P ⊙ (dP − Δ), dP = dy·values:
1. `_prepare_kernel`: Δ [B, H, T] (fp32), and each group's rotated, scaled query
   q̂ = rope_c(q)·log2(e)/√d [B, T, G·d] in the model dtype, exactly the forward's dot operand
   (so the recomputed scores equal the forward's bit for bit, and no loop below evaluates RoPE).
   With the layer's output gate z (y = sigmoid(z) ⊙ mixing) also z's gradient dy ⊙ y ⊙ (1 − σ) and
   the mixing's own output gradient dy ⊙ σ, which the kernels below read as dy.
2. `_summary_grad_kernel`: per (block of summaries, batch, head), a loop over the later query
   rows: dKs = Σ_t dS q̂ / log2(e), dVs = Σ_t P dy (fp32, [B, H, T//L, d], still rotated).
   q̂ is loaded transposed; the rows where the block is partly visible run a masked loop, the
   rest an unmasked one. By default (not under torch.use_deterministic_algorithms) it also adds
   dq̂ = Σ_j dS k_j into an fp32 accumulator with atomics (TMA bulk reductions on the GPU), as
   FlashAttention-2 does, since it has dS in hand: the query side then needs no loop over the
   summaries (5 matmuls per pair, not 7). The accumulator is per group, [B, T, G·d]: a group's heads
   share q and RoPE's angle, so their dq̂ can be summed before the rotation back (H/G times fewer
   bytes to zero, add into and read back).
3. `_query_grad_kernel` (deterministic mode only): per (block of whole chunks, batch, head), dq̂
   through the summaries (a full and a masked loop over them), per head; their group sums are the
   buffer the atomics fill otherwise.
4. `_recurrence_grad_kernel`: per (tile of chunks, batch, head), backwards over the L positions,
   everything that is local to a token: the own state's score and value gradients (P_own, dS_own),
   dq = rope⁻¹(dq̂)/√d + dS_own k̃; the direct gradients of k̃, ṽ (own score, own value and, at the
   chunk end, the summary gradients rotated back by the chunk index); then the reverse recurrence
   λ[t] = direct[t] + g[t+1] λ[t+1] inside each chunk, dk, dv = (1 − g) λ and the gate gradient
   df = (1 − g) Σ λ ⊙ (state − input) (this is ∂/∂g · g(1−g) without a division by g). The direct
   gradients never leave registers. The states k̃, ṽ come from rat_fwd's sequential `_states_kernel`,
   run again rather than kept from the forward (that would be 2 fp32 [B, T, D] of activation memory
   per layer). dq, dk are written per head [B, T, H·d] and summed over each group's heads afterwards,
   into the caller's tensors (for example slices of one projection gradient); dv, df go there directly;
   the gate-bias gradient as per-program partial sums.

Steps 1–2 (`summary_gradients`) and 3–4 (`input_gradients`) are callable apart, with the forward's
chunk offsets: under context parallelism a block's tokens attend to summaries of other ranks, whose
gradients are reduce-scattered between the two parts. Packed documents as in rat_fwd: the kernels that touch
the inputs and their gradients read and write the tokens in place, the rest (Δ, q̂, dq̂, the mixing's output
gradient, which `_prepare_kernel` then writes in slots) run over the C·L slots; the summary side's rows stop
at the end of its summaries' documents.
"""

import math

import torch
import triton
import triton.language as tl

from .blocks import Blocks, blocks
from .common import (LOG2E, chunk_tile, document_start, document_summaries, dot, first_chunk, ieee_dots,
                     interpreting, rope_cos_sin, row_blocks, token_rows)
from .rat_fwd import CHUNKS_PER_PROGRAM, Documents, check_documents, inverse_frequencies, recurrent_states


@triton.jit
def _prepare_kernel(q_ptr, y_ptr, dy_ptr, z_ptr, dz_ptr, dmix_ptr, inv_freq_ptr, offset_ptr, doc_ptr, start_ptr,
                    delta_ptr, qr_ptr, sq_b, sq_t, sz_b, sz_t, T, n_tok, qk_scale,
                    H: tl.constexpr, G: tl.constexpr, L: tl.constexpr, HALF: tl.constexpr, BQ: tl.constexpr,
                    GATED: tl.constexpr):
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    D_HEAD: tl.constexpr = 2 * HALF
    rows = pid_t * BQ + tl.arange(0, BQ)
    rmask = rows < T
    mask = rmask[:, None]
    b64 = b.to(tl.int64)
    src, present = token_rows(start_ptr, b64, rows, T, n_tok, T // L, L)  # y, dy, z, q in tokens
    if start_ptr is None:
        n_tok = T
    tok = present[:, None]
    dcols = tl.arange(0, D_HEAD)
    off = (b64 * n_tok + src[:, None]) * (H * D_HEAD) + h * D_HEAD + dcols[None, :]
    mix = (b64 * T + rows[:, None]) * (H * D_HEAD) + h * D_HEAD + dcols[None, :]  # slots
    y = tl.load(y_ptr + off, mask=tok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + off, mask=tok, other=0.0).to(tl.float32)
    # Δ = Σ dy·y; gated (y is sigmoid(z) ⊙ mixing, dy its gradient) that is Σ dy·y too, the mixing's own
    # gradient is dy ⊙ sigmoid(z), and z's is dy ⊙ y ⊙ (1 − sigmoid(z))
    tl.store(delta_ptr + pid_bh.to(tl.int64) * T + rows, tl.sum(y * dy, 1), mask=rmask)
    if GATED:
        z_off = b64 * sz_b + src[:, None] * sz_t + h * D_HEAD + dcols[None, :]
        s = tl.sigmoid(tl.load(z_ptr + z_off, mask=tok, other=0.0).to(tl.float32))
        tl.store(dmix_ptr + mix, (dy * s).to(dmix_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + z_off, (dy * y * (1 - s)).to(dz_ptr.dtype.element_ty), mask=tok)
    elif start_ptr is not None:  # packed documents: the output gradient in slots, zeros past the chunks' ends
        tl.store(dmix_ptr + mix, dy.to(dmix_ptr.dtype.element_ty), mask=mask)
    if h < G:  # one program per group writes its rotated queries
        cols = tl.arange(0, HALF)
        q_rows = q_ptr + b64 * sq_b + src[:, None] * sq_t + h * D_HEAD + cols[None, :]
        q1 = tl.load(q_rows, mask=tok, other=0.0).to(tl.float32)
        q2 = tl.load(q_rows + HALF, mask=tok, other=0.0).to(tl.float32)
        angle = first_chunk(offset_ptr, b64) + rows // L
        if doc_ptr is not None:  # packed documents: the chunk index within the document
            angle -= document_start(doc_ptr, b64, rows // L, T // L, rmask)
        cos, sin = rope_cos_sin(angle, tl.load(inv_freq_ptr + cols))
        out = qr_ptr + (b64 * T + rows[:, None]) * (G * D_HEAD) + h * D_HEAD + cols[None, :]
        QT = qr_ptr.dtype.element_ty
        tl.store(out, ((q1 * cos - q2 * sin) * qk_scale).to(QT), mask=mask)
        tl.store(out + HALF, ((q2 * cos + q1 * sin) * qk_scale).to(QT), mask=mask)


@triton.jit
def _summary_grad_steps(dk, dv, kb, vb, j, qr_head, dy_head, lse_head, delta_head, dq_target, doc_ptr, b, h, first,
                        t_lo, t_hi, T, G: tl.constexpr, H: tl.constexpr, L: tl.constexpr, D_HEAD: tl.constexpr,
                        BQ: tl.constexpr, MASKED: tl.constexpr, ACC_DQ: tl.constexpr, F32: tl.constexpr):
    """Accumulate dKs, dVs of one summary block over query rows [t_lo, t_hi); with ACC_DQ also add
    the block's share of each row's dq̂ (rotated space) into the fp32 accumulator `dq_target` [B, T, G·d]
    (per group: the heads of a group share their queries and, chunk by chunk, RoPE's angle, so their dq̂
    add up before the rotation back): through a TMA descriptor (one bulk reduction per tile; rows past
    T are dropped), or, in the Triton interpreter, which has no descriptor reductions, and with fp32
    inputs, element atomics through a pointer to the group's columns. (TMA loads of the q̂ and dy tiles, transposed for the dots, measured
    25% slower here than pointer loads.)

    Rows past T get lse = +inf, hence P = 0; MASKED adds the visibility j < c of each row (c: its
    global chunk index, `first` + row // L) and, over packed documents (doc_ptr), j >= its document start.
    """
    DT = kb.dtype
    dcols = tl.arange(0, D_HEAD)
    for t0 in range(t_lo, t_hi, BQ):
        rows = t0 + tl.arange(0, BQ)
        rmask = rows < T
        qt = tl.load(qr_head + rows[None, :] * (G * D_HEAD) + dcols[:, None], mask=rmask[None, :], other=0.0)
        lse = tl.load(lse_head + rows, mask=rmask, other=float("inf"))
        pt = tl.exp2(dot(kb, qt, DT, F32) - lse[None, :])  # [BC, BQ]
        if MASKED:
            visible = j[:, None] < (first + rows // L)[None, :]
            if doc_ptr is not None:
                visible &= j[:, None] >= document_start(doc_ptr, b, rows // L, T // L, rmask)[None, :]
            pt = tl.where(visible, pt, 0.0)
        dy = tl.load(dy_head + rows[:, None] * (H * D_HEAD) + dcols[None, :], mask=rmask[:, None], other=0.0)
        delta = tl.load(delta_head + rows, mask=rmask, other=0.0)
        dst = pt * (dot(vb, tl.trans(dy), DT, F32) - delta[None, :])
        dv += dot(pt, dy, DT, F32)
        dk += dot(dst, tl.trans(qt), DT, F32)
        if ACC_DQ:
            dq = dot(tl.trans(dst), kb, DT, F32)
            if F32:  # the interpreter, fp32 inputs
                tl.atomic_add(dq_target + rows[:, None] * (G * D_HEAD) + dcols[None, :], dq, mask=rmask[:, None],
                              sem="relaxed")
            else:
                dq_target.atomic_add([b, t0, (h % G) * D_HEAD], dq.reshape(1, BQ, D_HEAD))
    return dk, dv


@triton.jit
def _summary_grad_kernel(qr_ptr, dy_ptr, lse_ptr, delta_ptr, offset_ptr, doc_ptr, ends_ptr, ks_ptr, vs_ptr, dks_ptr, dvs_ptr, dq_target,
                         T, CS, dk_scale,
                         H: tl.constexpr, G: tl.constexpr, L: tl.constexpr, D_HEAD: tl.constexpr,
                         BQ: tl.constexpr, BC: tl.constexpr, ACC_DQ: tl.constexpr, F32: tl.constexpr):
    # the first summary blocks see the most rows: every head's block 0 is launched first, so that no
    # long program starts last
    pid_bh, pid_c = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    j0 = pid_c * BC
    j = j0 + tl.arange(0, BC)
    dcols = tl.arange(0, D_HEAD)
    jmask = (j < CS)[:, None]
    sp = pid_bh.to(tl.int64) * CS * D_HEAD + j[:, None] * D_HEAD + dcols[None, :]
    kb = tl.load(ks_ptr + sp, mask=jmask, other=0.0)
    vb = tl.load(vs_ptr + sp, mask=jmask, other=0.0)
    dk = tl.zeros([BC, D_HEAD], tl.float32)
    dv = tl.zeros([BC, D_HEAD], tl.float32)
    b64 = b.to(tl.int64)
    qr_head = qr_ptr + b64 * T * (G * D_HEAD) + (h % G) * D_HEAD
    dy_head = dy_ptr + b64 * T * (H * D_HEAD) + h * D_HEAD
    lse_head = lse_ptr + pid_bh.to(tl.int64) * T
    delta_head = delta_ptr + pid_bh.to(tl.int64) * T
    if ACC_DQ and F32:  # the pointer path: this head's group's columns of the accumulator
        dq_target += b64 * T * (G * D_HEAD) + (h % G) * D_HEAD
    # row t (global chunk first + t // L) sees summary j iff t >= (j - first + 1)·L: none of the block
    # before (j0 - first + 1)·L, all of it from (j0 + BC - first)·L
    first = first_chunk(offset_ptr, b64)
    t_lo = tl.maximum(j0 - first + 1, 0) * L // BQ * BQ
    t_mid = tl.minimum(tl.cdiv(tl.maximum(j0 + BC - first, 0) * L, BQ) * BQ, T)
    if doc_ptr is None:
        dk, dv = _summary_grad_steps(dk, dv, kb, vb, j, qr_head, dy_head, lse_head, delta_head, dq_target, None, b,
                                     h, first, t_lo, t_mid, T, G, H, L, D_HEAD, BQ, True, ACC_DQ, F32)
        dk, dv = _summary_grad_steps(dk, dv, kb, vb, j, qr_head, dy_head, lse_head, delta_head, dq_target, None, b,
                                     h, first, t_mid, T, T, G, H, L, D_HEAD, BQ, False, ACC_DQ, F32)
    else:  # packed documents: the rows of the block's documents, ends_ptr [B, CS] (rows_seeing)
        t_end = tl.load(ends_ptr + b64 * CS + tl.minimum(j0 + BC, CS) - 1) * L  # past the last summary's document
        t_all = tl.load(ends_ptr + b64 * CS + j0) * L // BQ * BQ  # up to here every row's document sees j0
        t_mid = tl.minimum(t_mid, t_end)
        dk, dv = _summary_grad_steps(dk, dv, kb, vb, j, qr_head, dy_head, lse_head, delta_head, dq_target, doc_ptr,
                                     b, h, first, t_lo, t_mid, T, G, H, L, D_HEAD, BQ, True, ACC_DQ, F32)
        dk, dv = _summary_grad_steps(dk, dv, kb, vb, j, qr_head, dy_head, lse_head, delta_head, dq_target, doc_ptr,
                                     b, h, first, t_mid, t_all, T, G, H, L, D_HEAD, BQ, False, ACC_DQ, F32)
        dk, dv = _summary_grad_steps(dk, dv, kb, vb, j, qr_head, dy_head, lse_head, delta_head, dq_target, doc_ptr,
                                     b, h, first, tl.maximum(t_mid, t_all), t_end, T, G, H, L, D_HEAD, BQ, True,
                                     ACC_DQ, F32)
    tl.store(dks_ptr + sp, dk * dk_scale, mask=jmask)
    tl.store(dvs_ptr + sp, dv, mask=jmask)


@triton.jit
def _query_grad_steps(dqr, qr, dy, lse, delta, chunk, lo, ks_head, vs_head, j_lo, j_hi, n_visible,
                      D_HEAD: tl.constexpr, BC: tl.constexpr, MASKED: tl.constexpr, F32: tl.constexpr,
                      DOC: tl.constexpr):
    """Accumulate dq̂ (rotated space) over summaries [j_lo, j_hi); MASKED: partly visible blocks (with DOC,
    packed documents, also below the rows' document starts `lo`)."""
    DT = qr.dtype
    dcols = tl.arange(0, D_HEAD)
    for j0 in range(j_lo, j_hi, BC):
        j = j0 + tl.arange(0, BC)
        t_ptrs = j[None, :] * D_HEAD + dcols[:, None]  # [d, BC]: summaries loaded transposed
        if MASKED:
            kt = tl.load(ks_head + t_ptrs, mask=(j < n_visible)[None, :], other=0.0)
            vt = tl.load(vs_head + t_ptrs, mask=(j < n_visible)[None, :], other=0.0)
        else:
            kt = tl.load(ks_head + t_ptrs)
            vt = tl.load(vs_head + t_ptrs)
        p = tl.exp2(dot(qr, kt, DT, F32) - lse[:, None])
        if MASKED:
            visible = j[None, :] < chunk[:, None]
            if DOC:
                visible &= j[None, :] >= lo[:, None]
            p = tl.where(visible, p, 0.0)
        ds = p * (dot(dy, vt, DT, F32) - delta[:, None])
        dqr += dot(ds, tl.trans(kt), DT, F32)
    return dqr


@triton.jit
def _query_grad_kernel(qr_ptr, offset_ptr, doc_ptr, ks_ptr, vs_ptr, dy_ptr, lse_ptr, delta_ptr, dqr_ptr, T, CS,
                       H: tl.constexpr, G: tl.constexpr, L: tl.constexpr, D_HEAD: tl.constexpr,
                       BQ: tl.constexpr, BC: tl.constexpr, F32: tl.constexpr):
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first
    pid_bh = tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    t0 = pid_t * BQ
    rows = t0 + tl.arange(0, BQ)
    dcols = tl.arange(0, D_HEAD)
    rmask = rows < T
    mask = rmask[:, None]
    b64 = b.to(tl.int64)
    first = first_chunk(offset_ptr, b64)
    chunk = first + rows // L  # global chunk index
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    qr = tl.load(qr_ptr + (b64 * T + rows[:, None]) * (G * D_HEAD) + (h % G) * D_HEAD + dcols[None, :],
                 mask=mask, other=0.0)
    out = (b64 * T + rows[:, None]) * (H * D_HEAD) + h * D_HEAD + dcols[None, :]  # [B, T, H·d] tensors
    dy = tl.load(dy_ptr + out, mask=mask, other=0.0)
    dqr = tl.zeros([BQ, D_HEAD], tl.float32)
    n_visible = first + tl.minimum(t0 + BQ - 1, T - 1) // L
    j_full = (first + t0 // L) // BC * BC  # summaries below are visible to every row of the block
    ks_head = ks_ptr + pid_bh.to(tl.int64) * CS * D_HEAD
    vs_head = vs_ptr + pid_bh.to(tl.int64) * CS * D_HEAD
    if doc_ptr is None:
        dqr = _query_grad_steps(dqr, qr, dy, lse, delta, chunk, chunk, ks_head, vs_head, 0, j_full, n_visible,
                                D_HEAD, BC, False, F32, False)
        dqr = _query_grad_steps(dqr, qr, dy, lse, delta, chunk, chunk, ks_head, vs_head, j_full, n_visible,
                                n_visible, D_HEAD, BC, True, F32, False)
    else:  # packed documents: as the forward's _attention_kernel
        lo = document_start(doc_ptr, b64, rows // L, T // L, rmask)
        j_lo, j_doc = document_summaries(doc_ptr, b64, t0, T, L, BQ, BC, j_full)
        dqr = _query_grad_steps(dqr, qr, dy, lse, delta, chunk, lo, ks_head, vs_head, j_lo, j_doc, n_visible,
                                D_HEAD, BC, True, F32, True)
        dqr = _query_grad_steps(dqr, qr, dy, lse, delta, chunk, lo, ks_head, vs_head, j_doc, j_full, n_visible,
                                D_HEAD, BC, False, F32, True)
        dqr = _query_grad_steps(dqr, qr, dy, lse, delta, chunk, lo, ks_head, vs_head, j_full, n_visible,
                                n_visible, D_HEAD, BC, True, F32, True)
    tl.store(dqr_ptr + out, dqr, mask=mask)


@triton.jit
def _reverse_step(lk, lv, g_next, direct_k, direct_v, ks, vs, f_ptrs, k_ptrs, v_ptrs, bias, dk_ptrs, dv_ptrs,
                  df_ptrs, mask):
    """One position (backwards) of the reverse recurrence for a [chunks, HALF] tile, given the direct
    gradients of its states k̃, ṽ. Returns λ_k, λ_v, this row's gate (the next step's g[t+1]) and the
    gate-bias partial sum."""
    g = tl.sigmoid(tl.load(f_ptrs, mask=mask, other=0.0).to(tl.float32) + bias[None, :])
    lk = direct_k + g_next * lk
    lv = direct_v + g_next * lv
    k = tl.load(k_ptrs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
    df = (1 - g) * (lk * (ks - k) + lv * (vs - v))
    tl.store(dk_ptrs, ((1 - g) * lk).to(dk_ptrs.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, ((1 - g) * lv).to(dv_ptrs.dtype.element_ty), mask=mask)
    tl.store(df_ptrs, df.to(df_ptrs.dtype.element_ty), mask=mask)
    return lk, lv, g, tl.sum(tl.where(mask, df, 0.0), 0)


@triton.jit
def _recurrence_grad_kernel(q_ptr, k_ptr, v_ptr, f_ptr, bias_ptr, inv_freq_ptr, offset_ptr, doc_ptr, start_ptr,
                            kst_ptr, vst_ptr, dy_ptr, lse_ptr, delta_ptr, dqr_ptr, dks_ptr, dvs_ptr, dq_ptr, dk_ptr,
                            dv_ptr, df_ptr, dbias_ptr, sq_b, sq_t, sk_b, sk_t, sv_b, sv_t, sf_b, sf_t, sdv_b, sdv_t, B, T,
                            n_tok, C, qk_scale, scale,
                            H: tl.constexpr, G: tl.constexpr, L: tl.constexpr, HALF: tl.constexpr,
                            NCH: tl.constexpr):
    pid_c, pid_bh = tl.program_id(0), tl.program_id(1)
    D_HEAD: tl.constexpr = 2 * HALF
    if start_ptr is None:
        n_tok = T
    b64, chunks, cols, kc, vc, bias1, bias2 = chunk_tile(pid_c, pid_bh, bias_ptr, H, G, HALF, NCH)
    angle = first_chunk(offset_ptr, b64) + chunks
    if doc_ptr is not None:  # packed documents: the chunk index within the document
        angle -= document_start(doc_ptr, b64, chunks, C, chunks < C)
    cos, sin = rope_cos_sin(angle, tl.load(inv_freq_ptr + cols))  # per chunk
    row_stats = pid_bh.to(tl.int64) * T  # lse, Δ: [B, H, T]
    own = ((pid_bh.to(tl.int64) * C + chunks) * D_HEAD)[:, None] + cols[None, :]  # this tile's summaries
    DQT = dq_ptr.dtype.element_ty
    lk1 = tl.zeros([NCH, HALF], tl.float32)
    lk2 = tl.zeros([NCH, HALF], tl.float32)
    lv1 = tl.zeros([NCH, HALF], tl.float32)
    lv2 = tl.zeros([NCH, HALF], tl.float32)
    g1 = tl.zeros([NCH, HALF], tl.float32)  # g[t+1]: none past a chunk end
    g2 = tl.zeros([NCH, HALF], tl.float32)
    db1 = tl.zeros([HALF], tl.float32)
    db2 = tl.zeros([HALF], tl.float32)
    # dq̂ is per group: the group's first head (h < G) rotates it back, the group sum adds it once
    first_head = (chunks * 0 + pid_bh % H) < G  # a tensor: the interpreter masks no scalar
    for i in range(L):
        rows = chunks * L + (L - 1 - i)  # slots
        rmask = rows < T
        mask = rmask[:, None]  # rows past T (and slots past a chunk's end): zero direct gradients, so λ stays 0
        src, present = token_rows(start_ptr, b64, rows, T, n_tok, C, L)  # q, k, v, f and their gradients in tokens
        tok = present[:, None]
        st = (b64 * T + rows[:, None]) * (H * D_HEAD) + vc[None, :]  # [B, T, H·d] scratch in slots
        heads = (b64 * n_tok + src[:, None]) * (H * D_HEAD) + vc[None, :]  # dq, dk per head, in tokens
        q_rows = q_ptr + b64 * sq_b + src[:, None] * sq_t + kc[None, :]
        ks1 = tl.load(kst_ptr + st, mask=mask, other=0.0)
        ks2 = tl.load(kst_ptr + st + HALF, mask=mask, other=0.0)
        vs1 = tl.load(vst_ptr + st, mask=mask, other=0.0)
        vs2 = tl.load(vst_ptr + st + HALF, mask=mask, other=0.0)
        q1 = tl.load(q_rows, mask=tok, other=0.0).to(tl.float32)
        q2 = tl.load(q_rows + HALF, mask=tok, other=0.0).to(tl.float32)
        dy1 = tl.load(dy_ptr + st, mask=mask, other=0.0).to(tl.float32)
        dy2 = tl.load(dy_ptr + st + HALF, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + row_stats + rows, mask=rmask, other=0.0)
        delta = tl.load(delta_ptr + row_stats + rows, mask=rmask, other=0.0)
        # the own state's softmax weight and score gradient (RoPE cancels in q·k̃: one angle)
        p_own = tl.exp2((tl.sum(q1 * ks1, 1) + tl.sum(q2 * ks2, 1)) * qk_scale - lse)
        ds_own = tl.where(rmask, p_own * (tl.sum(dy1 * vs1, 1) + tl.sum(dy2 * vs2, 1) - delta) * scale, 0.0)
        p_own = tl.where(rmask, p_own, 0.0)
        dqr = dqr_ptr + (b64 * T + rows[:, None]) * (G * D_HEAD) + kc[None, :]
        group_mask = (rmask & first_head)[:, None]
        dqr1 = tl.load(dqr, mask=group_mask, other=0.0)
        dqr2 = tl.load(dqr + HALF, mask=group_mask, other=0.0)
        tl.store(dq_ptr + heads, ((dqr1 * cos + dqr2 * sin) * scale + ds_own[:, None] * ks1).to(DQT), mask=tok)
        tl.store(dq_ptr + heads + HALF, ((dqr2 * cos - dqr1 * sin) * scale + ds_own[:, None] * ks2).to(DQT), mask=tok)
        # direct gradients of k̃, ṽ: own score and value, and at chunk ends (i = 0) the summary's, rotated back
        end = mask & (i == 0)
        dsk1 = tl.load(dks_ptr + own, mask=end, other=0.0)
        dsk2 = tl.load(dks_ptr + own + HALF, mask=end, other=0.0)
        direct_k1 = ds_own[:, None] * q1 + dsk1 * cos + dsk2 * sin
        direct_k2 = ds_own[:, None] * q2 + dsk2 * cos - dsk1 * sin
        direct_v1 = p_own[:, None] * dy1 + tl.load(dvs_ptr + own, mask=end, other=0.0)
        direct_v2 = p_own[:, None] * dy2 + tl.load(dvs_ptr + own + HALF, mask=end, other=0.0)
        k_rows = k_ptr + b64 * sk_b + src[:, None] * sk_t + kc[None, :]
        v_rows = v_ptr + b64 * sv_b + src[:, None] * sv_t + vc[None, :]
        f_rows = f_ptr + b64 * sf_b + src[:, None] * sf_t + vc[None, :]
        grad = b64 * sdv_b + src[:, None] * sdv_t + vc[None, :]  # dv, df: [B, T, H·d], strided
        lk1, lv1, g1, part1 = _reverse_step(lk1, lv1, g1, direct_k1, direct_v1, ks1, vs1, f_rows, k_rows, v_rows,
                                            bias1, dk_ptr + heads, dv_ptr + grad, df_ptr + grad, tok)
        lk2, lv2, g2, part2 = _reverse_step(lk2, lv2, g2, direct_k2, direct_v2, ks2, vs2, f_rows + HALF,
                                            k_rows + HALF, v_rows + HALF, bias2, dk_ptr + heads + HALF,
                                            dv_ptr + grad + HALF, df_ptr + grad + HALF, tok)
        db1 += part1
        db2 += part2
    part = (pid_c.to(tl.int64) * B + b64) * (H * D_HEAD) + vc
    tl.store(dbias_ptr + part, db1)
    tl.store(dbias_ptr + part + HALF, db2)


def group_sum(heads: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, H·d] per head -> [B, T, G·d] (`width` = G·d) per group, head h in group h mod G."""
    B, T, D = heads.shape
    return torch.sum(heads.view(B, T, D // width, width), 2, out=out)


def rows_seeing(first_chunk: torch.Tensor | None, n_summaries: int) -> torch.Tensor | None:
    """Over packed documents, for each summary j < n_summaries: the number of this sequence's chunks whose
    document starts at or before j ([B, n_summaries] int32). first_chunk never decreases along a sequence, so
    these chunks are a prefix, past which no row sees summary j: where the summary side's loop over rows stops."""
    if first_chunk is None:
        return None
    j = torch.arange(n_summaries, device=first_chunk.device, dtype=first_chunk.dtype)
    return torch.searchsorted(first_chunk, j.expand(first_chunk.shape[0], -1).contiguous(), right=True).int()


def summary_gradients(dy, q, y, lse, ks, vs, chunk_size: int, head_dim: int, rope_base: float,
                      chunk_offset: torch.Tensor | None = None, config: Blocks | None = None,
                      atomic_dq: bool | None = None, gate: tuple[torch.Tensor, torch.Tensor] | None = None,
                      documents: Documents | None = None):
    """The backward's first part: the gradients dKs, dVs (fp32) of every summary in Ks, Vs
    [B, H, CS, d] that this sequence's tokens attend to, and what the second part reuses (Δ, q̂, dq̂).
    Under context parallelism the summary gradients are reduced across ranks between the parts.

    atomic_dq (default: unless torch.use_deterministic_algorithms is on): the summary side also adds
    each block's share of the queries' gradient into an fp32 accumulator (atomically, so in an
    unspecified order), and the query side skips its own pass over the summaries: 5 matmuls per
    (summary, query) pair instead of 7. Off, every gradient is bit-reproducible.

    gate (z, dz): y is the gated output sigmoid(z) ⊙ mixing (rat_forward's `gate`) and dy its gradient;
    z's gradient is written into dz (both [B, T, H·d], strided). documents: packed documents, as in
    rat_fwd.rat_states (what is reused is then in slots: lse's [B, H, S])."""
    B, T, D = dy.shape
    S = lse.shape[-1]
    H, G, L, d = D // head_dim, q.shape[-1] // head_dim, chunk_size, head_dim
    cfg = config or blocks("summary_grad", L, d, ks.dtype)
    dy = dy.contiguous()
    delta = torch.empty(B, H, S, device=dy.device, dtype=torch.float32)
    qr = torch.empty(B, S, G * d, device=dy.device, dtype=ks.dtype)
    z, dz = gate if gate is not None else (None, None)
    documents = check_documents(documents, L)
    first, start = documents or (None, None)
    # the mixing's own output gradient, in slots
    dmix = torch.empty(B, S, D, device=dy.device, dtype=dy.dtype) if gate is not None or documents is not None else dy
    prep_rows = 16 if interpreting() else 64
    _prepare_kernel[(triton.cdiv(S, prep_rows), B * H)](
        q, y, dy, z, dz, dmix, inverse_frequencies(d, rope_base, dy.device), chunk_offset, first, start, delta, qr,
        q.stride(0), q.stride(1), *((z.stride(0), z.stride(1)) if gate is not None else (0, 0)), S, T,
        LOG2E / math.sqrt(d), H=H, G=G, L=L, HALF=d // 2, BQ=prep_rows, GATED=gate is not None, num_warps=4)
    CS = ks.shape[2]
    dks = torch.zeros(B, H, CS, d, device=dy.device, dtype=torch.float32)
    dvs = torch.zeros_like(dks)
    if atomic_dq is None:
        atomic_dq = not torch.are_deterministic_algorithms_enabled()
    dq_rotated = torch.zeros(B, S, G * d, device=dy.device, dtype=torch.float32) if atomic_dq else None
    if CS:
        f32 = ieee_dots(ks)
        dq_target = dq_rotated if f32 or not atomic_dq else row_blocks(dq_rotated, cfg.bq, d)
        _summary_grad_kernel[(B * H, triton.cdiv(CS, cfg.bc))](
            qr, dmix, lse, delta, chunk_offset, first, rows_seeing(first, CS), ks, vs, dks, dvs, dq_target, S, CS,
            1.0 / LOG2E, H=H, G=G, L=L, D_HEAD=d, BQ=cfg.bq, BC=cfg.bc, ACC_DQ=atomic_dq, F32=f32,
            num_warps=cfg.warps, num_stages=cfg.stages)
    return dks, dvs, (dmix, delta, qr, dq_rotated)


def input_gradients(q, k, v, f, gate_bias, lse, ks, vs, reused, dks_own, dvs_own, chunk_size: int, head_dim: int,
                    rope_base: float, chunk_offset: torch.Tensor | None = None, config: Blocks | None = None,
                    out: tuple[torch.Tensor, ...] | None = None, documents: Documents | None = None):
    """The backward's second part: (dq, dk, dv, df, dgate_bias), given the total gradients dKs_own, dVs_own
    [B, H, S//L, d] of this sequence's own summaries and `reused` from summary_gradients. `out`: where
    to write dq, dk, dv, df (for example the column slices of one projection gradient; dq, dk with
    equal strides, dv, df likewise); new tensors by default. documents: packed documents, as in
    rat_fwd.rat_states."""
    dy, delta, qr, dq_rotated = reused
    dks_own, dvs_own = dks_own.contiguous(), dvs_own.contiguous()
    B, T, D = v.shape
    S = lse.shape[-1]
    H, G, L, d = D // head_dim, q.shape[-1] // head_dim, chunk_size, head_dim
    inv_freq = inverse_frequencies(d, rope_base, v.device)
    scale = 1.0 / math.sqrt(d)
    documents = check_documents(documents, L)
    first, start = documents or (None, None)
    if dq_rotated is None:  # deterministic: the query side's own pass over the summaries
        cfg = config or blocks("query_grad", L, d, v.dtype)
        dq_heads_rotated = torch.empty(B, S, D, device=v.device, dtype=torch.float32)
        _query_grad_kernel[(triton.cdiv(S, cfg.bq), B * H)](
            qr, chunk_offset, first, ks, vs, dy, lse, delta, dq_heads_rotated, S, max(ks.shape[2], 1), H=H, G=G,
            L=L, D_HEAD=d, BQ=cfg.bq, BC=cfg.bc, F32=ieee_dots(v), num_warps=cfg.warps,
            num_stages=cfg.stages)
        dq_rotated = group_sum(dq_heads_rotated, G * d)
    kst, vst = recurrent_states(k, v, f, gate_bias, L, d, inv_freq, documents=documents)
    if out is None:
        out = (torch.empty(B, T, G * d, device=v.device, dtype=q.dtype), torch.empty(B, T, G * d, device=v.device,
               dtype=k.dtype), torch.empty(B, T, D, device=v.device, dtype=v.dtype), torch.empty(B, T, D,
               device=v.device, dtype=f.dtype))
    dq, dk, dv, df = out
    assert dv.stride() == df.stride(), "dv, df share one layout"
    dq_heads = torch.empty(B, T, D, device=v.device, dtype=q.dtype)
    dk_heads = torch.empty(B, T, D, device=v.device, dtype=k.dtype)
    n_programs = triton.cdiv(triton.cdiv(S, L), CHUNKS_PER_PROGRAM)
    dbias = torch.empty(n_programs * B, D, device=v.device, dtype=torch.float32)
    _recurrence_grad_kernel[(n_programs, B * H)](
        q, k, v, f, gate_bias, inv_freq, chunk_offset, first, start, kst, vst, dy, lse, delta, dq_rotated, dks_own,
        dvs_own, dq_heads, dk_heads, dv, df, dbias, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), f.stride(0), f.stride(1), dv.stride(0), dv.stride(1), B, S, T, max(S // L, 1), LOG2E * scale,
        scale, H=H, G=G, L=L, HALF=d // 2, NCH=CHUNKS_PER_PROGRAM, num_warps=4)
    group_sum(dq_heads, G * d, out=dq)  # accumulated in fp32, rounded once
    group_sum(dk_heads, G * d, out=dk)
    return dq, dk, dv, df, dbias.sum(0).to(gate_bias.dtype)


def rat_backward(dy, q, k, v, f, gate_bias, y, lse, ks, vs, chunk_size: int, head_dim: int, rope_base: float,
                 configs: dict[str, Blocks] | None = None, atomic_dq: bool | None = None,
                 gate: tuple[torch.Tensor, torch.Tensor] | None = None, out: tuple[torch.Tensor, ...] | None = None,
                 documents: Documents | None = None):
    """Gradients (dq, dk, dv, df, dgate_bias) of rat_forward's y: both parts, the summaries its own.

    `configs` ("summary_grad", "query_grad") override kernels/blocks.py's (kernels/tune.py); `atomic_dq`
    and `gate` as in summary_gradients, `out` as in input_gradients, `documents` (packed documents) as in
    rat_fwd.rat_states.
    """
    configs = configs or {}
    dks, dvs, reused = summary_gradients(dy, q, y, lse, ks, vs, chunk_size, head_dim, rope_base,
                                         config=configs.get("summary_grad"), atomic_dq=atomic_dq, gate=gate,
                                         documents=documents)
    return input_gradients(q, k, v, f, gate_bias, lse, ks, vs, reused, dks, dvs, chunk_size, head_dim, rope_base,
                           config=configs.get("query_grad"), out=out, documents=documents)
