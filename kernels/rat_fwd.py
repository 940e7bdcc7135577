"""RAT sequence mixing, forward (docs/design.md#the-rat-layer): two passes over the per-token tensors.

1. `_states_kernel`: per (tile of chunks, batch, head) the in-chunk recurrences of k and v, one
   position at a time over the L positions of all the tile's chunks (elementwise, in fp32).
   Writes the states k̃, ṽ [B, T, H·d] (fp32, a scratch for the next pass) and each full chunk's
   final state, k̃ rotated by its chunk index, into the chunk summaries Ks, Vs [B, H, T//L, d].
2. `_attention_kernel`: per (block of whole chunks, batch, head) one online softmax over the
   summaries j < c. The own-state score q·k̃ (RoPE cancels: q and k̃ share the angle) seeds the
   running max, sum and accumulator, so there is no merge pass. Writes y [B, T, H·d] and the
   log-sum-exp (base 2) [B, H, T] for the backward.
3. `_gate_kernel` (with the layer's output gate z): y ← sigmoid(z) ⊙ y in place.

Inputs are the strided column slices of the input projection: q, k [B, T, G·d] (head h uses
group h mod G), v, f [B, T, H·d] (f before the sigmoid; the gate bias is added in the kernel).

The passes are also callable one by one (`rat_states`, `summary_attention`) with a chunk offset per
sequence: a sequence may be one block of a longer one, its chunks numbered from the offset and its
tokens attending to the longer sequence's summaries. Context parallelism gathers every rank's
summaries between the two passes (ratpt/parallel/context_parallel.py).

Packed documents (`first_chunk` and `chunk_start`, ratpt.ops.documents.DocumentChunks: every document cut into
chunks from its first token, the last one shorter): the passes run over C·L slots, L per chunk, and read and
write the tokens in place (common.token_rows), so the scratch (states, log-sum-exp) and the summaries are in
slots, the inputs and y in tokens, and nothing is padded or copied outside. The recurrences restart at every
chunk as they are; a row sees the summaries from its document's first chunk on, and RoPE rotates by the chunk
index within the document. A compile-time path of its own.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from .blocks import Blocks, blocks
from .common import (LOG2E, chunk_tile, document_start, document_summaries, dot, first_chunk, ieee_dots,
                     interpreting, join_halves, rope_cos_sin, state_step, summary_blocks, token_rows)

Documents = tuple[torch.Tensor, torch.Tensor]  # packed documents: (first_chunk, chunk_start), rat_states
CHUNKS_PER_PROGRAM = 16  # rows of the [chunks, d/2] tiles of the sequential recurrence kernels


@triton.jit
def _states_kernel(k_ptr, v_ptr, f_ptr, bias_ptr, inv_freq_ptr, offset_ptr, doc_ptr, start_ptr, kst_ptr, vst_ptr,
                   ks_ptr, vs_ptr, sk_b, sk_t, sv_b, sv_t, sf_b, sf_t, T, n_tok, C,
                   H: tl.constexpr, G: tl.constexpr, L: tl.constexpr, HALF: tl.constexpr,
                   NCH: tl.constexpr, SUMMARIES: tl.constexpr):
    pid_c, pid_bh = tl.program_id(0), tl.program_id(1)
    D_HEAD: tl.constexpr = 2 * HALF
    b64, chunks, cols, kc, vc, bias1, bias2 = chunk_tile(pid_c, pid_bh, bias_ptr, H, G, HALF, NCH)
    ks1 = tl.zeros([NCH, HALF], tl.float32)
    ks2 = tl.zeros([NCH, HALF], tl.float32)
    vs1 = tl.zeros([NCH, HALF], tl.float32)
    vs2 = tl.zeros([NCH, HALF], tl.float32)
    for l in range(L):
        rows = chunks * L + l  # slots
        mask = (rows < T)[:, None]
        src, present = token_rows(start_ptr, b64, rows, T, n_tok, C, L)
        load = present[:, None]
        k_rows = k_ptr + b64 * sk_b + src[:, None] * sk_t + kc[None, :]
        v_rows = v_ptr + b64 * sv_b + src[:, None] * sv_t + vc[None, :]
        f_rows = f_ptr + b64 * sf_b + src[:, None] * sf_t + vc[None, :]
        _, _, _, ks1, vs1 = state_step(ks1, vs1, f_rows, k_rows, v_rows, bias1, load)
        _, _, _, ks2, vs2 = state_step(ks2, vs2, f_rows + HALF, k_rows + HALF, v_rows + HALF, bias2, load)
        st = (b64 * T + rows[:, None]) * (H * D_HEAD) + vc[None, :]
        tl.store(kst_ptr + st, ks1, mask=mask)
        tl.store(kst_ptr + st + HALF, ks2, mask=mask)
        tl.store(vst_ptr + st, vs1, mask=mask)
        tl.store(vst_ptr + st + HALF, vs2, mask=mask)
    if SUMMARIES:  # the states after the loop are the chunk ends; only full chunks are summaries
        angle = first_chunk(offset_ptr, b64) + chunks
        if doc_ptr is not None:  # packed documents: the chunk index within the document
            angle -= document_start(doc_ptr, b64, chunks, C, chunks < C)
        cos, sin = rope_cos_sin(angle, tl.load(inv_freq_ptr + cols))
        out = ((pid_bh.to(tl.int64) * C + chunks) * D_HEAD)[:, None] + cols[None, :]
        smask = (chunks < C)[:, None]
        DT = ks_ptr.dtype.element_ty
        tl.store(ks_ptr + out, (ks1 * cos - ks2 * sin).to(DT), mask=smask)
        tl.store(ks_ptr + out + HALF, (ks2 * cos + ks1 * sin).to(DT), mask=smask)
        tl.store(vs_ptr + out, vs1.to(DT), mask=smask)
        tl.store(vs_ptr + out + HALF, vs2.to(DT), mask=smask)


@triton.jit
def _softmax_steps(acc, m, l_sum, qr, ks_desc, vs_desc, bh, chunk, lo, j_lo, j_hi,
                   D_HEAD: tl.constexpr, BC: tl.constexpr, MASKED: tl.constexpr, F32: tl.constexpr,
                   DOC: tl.constexpr):
    """Online-softmax steps over summaries [j_lo, j_hi); MASKED: the blocks where j < c differs by row, and
    with DOC (packed documents) also j >= lo, the row's document start.

    The summary tiles come through TMA descriptors of [B·H, CS, d] (past CS: zeros). A masked block may
    also hold summaries no row sees (j >= c): real, finite ones, whose scores the mask sets to -inf."""
    DT = ks_desc.dtype
    for j0 in range(j_lo, j_hi, BC):
        kb = ks_desc.load([bh, j0, 0]).reshape(BC, D_HEAD)
        s = dot(qr, tl.trans(kb), DT, F32)
        if MASKED:
            j = (j0 + tl.arange(0, BC))[None, :]
            visible = j < chunk[:, None]
            if DOC:
                visible &= j >= lo[:, None]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        vb = vs_desc.load([bh, j0, 0]).reshape(BC, D_HEAD)
        acc = acc * alpha[:, None] + dot(p, vb, DT, F32)
        m = m_new
    return acc, m, l_sum


@triton.jit
def _attention_kernel(q_ptr, kst_ptr, vst_ptr, inv_freq_ptr, offset_ptr, doc_ptr, start_ptr, ks_desc, vs_desc, y_ptr,
                      lse_ptr, sq_b, sq_t, T, n_tok, qk_scale,
                      H: tl.constexpr, G: tl.constexpr, L: tl.constexpr, HALF: tl.constexpr,
                      BQ: tl.constexpr, BC: tl.constexpr, F32: tl.constexpr):
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first
    pid_bh = tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    D_HEAD: tl.constexpr = 2 * HALF
    DT = ks_desc.dtype
    t0 = pid_t * BQ
    rows = t0 + tl.arange(0, BQ)
    cols = tl.arange(0, HALF)
    rmask = rows < T
    mask = rmask[:, None]
    b64 = b.to(tl.int64)
    src, present = token_rows(start_ptr, b64, rows, T, n_tok, T // L, L)  # q and y are in tokens
    if start_ptr is None:
        n_tok = T
    first = first_chunk(offset_ptr, b64)
    chunk = first + rows // L  # global chunk index: RoPE angle, and summaries j < chunk are visible
    kc = (h % G) * D_HEAD + cols
    vc = h * D_HEAD + cols
    q_rows = q_ptr + b64 * sq_b + src[:, None] * sq_t
    st = (b64 * T + rows[:, None]) * (H * D_HEAD) + vc[None, :]
    ks1 = tl.load(kst_ptr + st, mask=mask, other=0.0)
    ks2 = tl.load(kst_ptr + st + HALF, mask=mask, other=0.0)
    vs1 = tl.load(vst_ptr + st, mask=mask, other=0.0)
    vs2 = tl.load(vst_ptr + st + HALF, mask=mask, other=0.0)
    q1 = tl.load(q_rows + kc[None, :], mask=present[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_rows + kc[None, :] + HALF, mask=present[:, None], other=0.0).to(tl.float32)
    # own state: softmax seeded with its score (max), weight 1 (sum) and value ṽ (accumulator)
    m = (tl.sum(q1 * ks1, 1) + tl.sum(q2 * ks2, 1)) * qk_scale
    l_sum = tl.full([BQ], 1.0, tl.float32)
    acc = join_halves(vs1, vs2, BQ, HALF)
    if doc_ptr is None:
        cos, sin = rope_cos_sin(chunk, tl.load(inv_freq_ptr + cols))
    else:  # packed documents: each row's document start, the first summary it sees and RoPE's origin
        lo = document_start(doc_ptr, b64, rows // L, T // L, rmask)
        cos, sin = rope_cos_sin(chunk - lo, tl.load(inv_freq_ptr + cols))
    qr = join_halves((q1 * cos - q2 * sin) * qk_scale, (q2 * cos + q1 * sin) * qk_scale, BQ, HALF).to(DT)
    # summaries j < c_first are visible to every row of the block; the rest up to n_visible to some
    n_visible = first + tl.minimum(t0 + BQ - 1, T - 1) // L
    j_full = (first + t0 // L) // BC * BC
    if doc_ptr is None:
        acc, m, l_sum = _softmax_steps(acc, m, l_sum, qr, ks_desc, vs_desc, pid_bh, chunk, chunk, 0, j_full, D_HEAD,
                                       BC, False, F32, False)
        acc, m, l_sum = _softmax_steps(acc, m, l_sum, qr, ks_desc, vs_desc, pid_bh, chunk, chunk, j_full, n_visible,
                                       D_HEAD, BC, True, F32, False)
    else:  # nothing below the first row's document start; j >= the last row's is visible by that bound to all
        j_lo, j_doc = document_summaries(doc_ptr, b64, t0, T, L, BQ, BC, j_full)
        acc, m, l_sum = _softmax_steps(acc, m, l_sum, qr, ks_desc, vs_desc, pid_bh, chunk, lo, j_lo, j_doc, D_HEAD,
                                       BC, True, F32, True)
        acc, m, l_sum = _softmax_steps(acc, m, l_sum, qr, ks_desc, vs_desc, pid_bh, chunk, lo, j_doc, j_full, D_HEAD,
                                       BC, False, F32, True)
        acc, m, l_sum = _softmax_steps(acc, m, l_sum, qr, ks_desc, vs_desc, pid_bh, chunk, lo, j_full, n_visible,
                                       D_HEAD, BC, True, F32, True)
    dcols = tl.arange(0, D_HEAD)
    y_rows = y_ptr + (b64 * n_tok + src[:, None]) * (H * D_HEAD) + h * D_HEAD + dcols[None, :]
    tl.store(y_rows, (acc / l_sum[:, None]).to(y_ptr.dtype.element_ty), mask=present[:, None])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * T + rows, m + tl.log2(l_sum), mask=rmask)


@triton.jit
def _gate_kernel(y_ptr, z_ptr, sz_b, sz_t, T, D, BT: tl.constexpr, BD: tl.constexpr):
    """y ← sigmoid(z) ⊙ y in place, y [B, T, D] contiguous, z strided. A pass of its own: gating inside the
    attention kernel's epilogue measured 2× slower there at T 4K (its [BQ, d] tiles of y and z at once)."""
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    y_tile = y_ptr + (b * T + rows[:, None]) * D + cols[None, :]
    z = tl.load(z_ptr + b * sz_b + rows[:, None] * sz_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_tile, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_tile, (y * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def inverse_frequencies(head_dim: int, base: float, device) -> torch.Tensor:
    """base^(-2i/d), computed exactly as ratpt.ops.rope_cos_sin does (fp32); once per (d, base, device),
    not in every pass and decode step (read-only)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def recurrent_states(k, v, f, gate_bias, chunk_size: int, head_dim: int, inv_freq: torch.Tensor,
                     summaries: tuple[torch.Tensor, torch.Tensor] | None = None,
                     chunk_offset: torch.Tensor | None = None, documents: Documents | None = None):
    """k̃, ṽ [B, S, H·d] (fp32; S = T, or the C·L slots of packed `documents`, check_documents); also writes the
    chunk summaries into `summaries` if given, rotated by their global chunk index (chunk_offset [B] int32 +
    local index; None: 0), less their document's first chunk over packed documents (rat_states)."""
    B, T, D = v.shape
    H, G, L = D // head_dim, k.shape[-1] // head_dim, chunk_size
    S = slots(documents, T, L)
    kst = torch.empty(B, S, D, device=v.device, dtype=torch.float32)
    vst = torch.empty_like(kst)
    ks, vs = summaries if summaries is not None else (kst, vst)
    first, start = documents or (None, None)
    _states_kernel[(triton.cdiv(triton.cdiv(S, L), CHUNKS_PER_PROGRAM), B * H)](
        k, v, f, gate_bias, inv_freq, chunk_offset, first, start, kst, vst, ks, vs, k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), f.stride(0), f.stride(1), S, T, max(S // L, 1), H=H, G=G, L=L, HALF=head_dim // 2,
        NCH=CHUNKS_PER_PROGRAM, SUMMARIES=summaries is not None and S >= L, num_warps=4)
    return kst, vst


def rat_states(k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float,
               chunk_offset: torch.Tensor | None = None, documents: Documents | None = None):
    """The forward's first pass: k̃, ṽ [B, S, H·d] (fp32 scratch; S = T, or C·L slots over packed documents) and
    the summaries Ks, Vs [B, H, S//L, d] of the full chunks, rotated by their global chunk index.

    documents (first_chunk, chunk_start), both [B, C] int32 (ratpt.ops.documents.DocumentChunks): for each
    chunk, the chunk its document starts at and its first token. The in-chunk recurrences restart at every
    chunk, hence at every document; the summaries are rotated by their chunk index within the document."""
    B, T, D = v.shape
    documents = check_documents(documents, chunk_size)
    S = slots(documents, T, chunk_size)
    ks = torch.empty(B, D // head_dim, S // chunk_size, head_dim, device=v.device, dtype=v.dtype)
    vs = torch.empty_like(ks)
    kst, vst = recurrent_states(k, v, f, gate_bias, chunk_size, head_dim,
                                inverse_frequencies(head_dim, rope_base, v.device), (ks, vs), chunk_offset, documents)
    return kst, vst, ks, vs


def summary_attention(q, kst, vst, ks, vs, chunk_size: int, head_dim: int, rope_base: float,
                      chunk_offset: torch.Tensor | None = None, config: Blocks | None = None,
                      gate: torch.Tensor | None = None, documents: Documents | None = None):
    """The forward's second pass: y [B, T, H·d] and lse [B, H, S] (base 2, fp32, per slot as the states kst,
    vst [B, S, H·d]) of each token's softmax over its own state and the summaries j < its global chunk index in
    Ks, Vs [B, H, CS, d] (the sequence's own, or, under context parallelism, those of the whole sequence it is a
    block of). With `gate` (the layer's z before its sigmoid, [B, T, H·d], strided) y is sigmoid(z) ⊙ y. With
    packed `documents` (rat_states) a token sees only the summaries from its document's first chunk on, and RoPE
    rotates it by its chunk index within the document."""
    B, S, D = kst.shape
    T = q.shape[1]
    H, G, L, d = D // head_dim, q.shape[-1] // head_dim, chunk_size, head_dim
    y = torch.empty(B, T, D, device=q.device, dtype=ks.dtype)
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    cfg = config or blocks("forward", L, d, ks.dtype)
    f32 = ieee_dots(ks)
    ks_desc, vs_desc = (summary_blocks(t, cfg.bc) for t in (ks, vs))
    first, start = check_documents(documents, L) or (None, None)
    _attention_kernel[(triton.cdiv(S, cfg.bq), B * H)](
        q, kst, vst, inverse_frequencies(d, rope_base, q.device), chunk_offset, first, start, ks_desc, vs_desc, y,
        lse, q.stride(0), q.stride(1), S, T, LOG2E / math.sqrt(d), H=H, G=G, L=L, HALF=d // 2, BQ=cfg.bq, BC=cfg.bc,
        F32=f32, num_warps=cfg.warps, num_stages=cfg.stages)
    if gate is not None:
        rows, cols = (16, 64) if interpreting() else (32, 256)
        _gate_kernel[(triton.cdiv(T, rows), triton.cdiv(D, cols), B)](y, gate, gate.stride(0), gate.stride(1), T, D,
                                                                      BT=rows, BD=cols, num_warps=4)
    return y, lse


def rat_forward(q, k, v, f, gate_bias, chunk_size: int, head_dim: int, rope_base: float,
                config: Blocks | None = None, gate: torch.Tensor | None = None,
                documents: Documents | None = None):
    """y [B, T, H·d], lse [B, H, S] (base 2, fp32), summaries Ks, Vs [B, H, S//L, d]: both passes.

    `config` overrides kernels/blocks.py's launch configuration (kernels/tune.py); `gate` as in
    summary_attention, `documents` (packed documents) as in rat_states.
    """
    kst, vst, ks, vs = rat_states(k, v, f, gate_bias, chunk_size, head_dim, rope_base, documents=documents)
    y, lse = summary_attention(q, kst, vst, ks, vs, chunk_size, head_dim, rope_base, config=config, gate=gate,
                               documents=documents)
    return y, lse, ks, vs


def check_documents(documents: Documents | None, chunk_size: int) -> Documents | None:
    """(first_chunk, chunk_start) as the kernels read them ([B, C] int32, contiguous), or None (no packed
    documents)."""
    if documents is None:
        return None
    first, start = documents
    if start is None or first.dim() != 2 or first.shape != start.shape:
        got = None if start is None else tuple(start.shape)
        raise ValueError(f"packed documents come as first_chunk and chunk_start of one shape [B, C] "
                         f"(ratpt.ops.documents.DocumentChunks): got {tuple(first.shape)} and {got}")
    return first.to(torch.int32).contiguous(), start.to(torch.int32).contiguous()


def slots(documents: Documents | None, T: int, chunk_size: int) -> int:
    """The length of the passes' scratch: T, or C·L over packed documents (every chunk L slots)."""
    return T if documents is None else documents[0].shape[1] * chunk_size


def rat_prefill(q, k, v, f, gate_bias, lengths: torch.Tensor, chunk_size: int, head_dim: int, rope_base: float):
    """Same contract as ratpt.ops.rat_prefill_mixing: the forward's two passes, whose fp32 states give
    the running k̃, ṽ at each sequence's last prompt token and whose summaries are the cache's slots."""
    q, k, v, f = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, f))
    kst, vst, ks, vs = rat_states(k, v, f, gate_bias, chunk_size, head_dim, rope_base)
    y, _ = summary_attention(q, kst, vst, ks, vs, chunk_size, head_dim, rope_base)
    rows, last = torch.arange(v.shape[0], device=v.device), lengths - 1
    return y, ks, vs, kst[rows, last], vst[rows, last]
