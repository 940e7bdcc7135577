"""Pieces shared by the RAT kernels: the gated chunk recurrence, RoPE over the chunk index, dots.

Elementwise work on a head's per-token tile (recurrences, RoPE) runs on two halves of width
d/2, the (real, imaginary) pairs of the half-split RoPE: rotating a pair is then elementwise.
The recurrences run sequentially over the L positions of a tile of chunks (one row per chunk),
with no cross-thread communication: a tile-wide associative scan along the rows measured ~10x
slower than the memory traffic it replaces.
Dots take full-width tiles (one K = d product instead of two K = d/2 ones): the halves are
joined once per program, never inside a loop.

Tolerances and precision: gates, recurrences, scores, softmax statistics and accumulators are
fp32; tensor-core dots take their operands in the input dtype (bf16/fp16), or fp32 with IEEE
products when the inputs are fp32 or when running in the Triton interpreter (whose bf16 dot is
broken).
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def ieee_dots(t: torch.Tensor) -> bool:
    """The `F32` of a kernel's dots over t's dtype: fp32 IEEE products for fp32 inputs, and in the Triton
    interpreter (whose bf16 dot is broken)."""
    return t.dtype == torch.float32 or interpreting()


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device, read once (launch choices ask on every call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


# Whether the decode kernels launch as programmatic dependents on Hopper and later (dependent_launch): on one
# H200 RAT-1.3B's compiled batch-1 step took 1.208 ms against 1.302 launched plainly, batch 64 the same
# (kernels/NOTES.md). benchmarks/generate.py --no-dependent-launch and the GPU decode tests turn it off.
DEPENDENT_LAUNCHES = True


def dependent_launch(device: torch.device) -> bool:
    """Whether the decode kernels launch as programmatic dependents (PDL, sm_90+) on `device`.

    A decode step is ~150 small kernels replayed in a CUDA graph; between two of them the GPU drains
    one grid before starting the next. Launched as a dependent, a kernel's programs start while its
    predecessor finishes, do what needs none of its results (address arithmetic, the first weight
    tile), and wait at after_predecessor for the predecessor's writes."""
    return DEPENDENT_LAUNCHES and device.type == "cuda" and _capability(device.index) >= (9, 0)


def launch_options(pdl: bool) -> dict[str, bool]:
    """The launch keywords of a kernel that calls after_predecessor(PDL=pdl)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def after_predecessor(PDL: tl.constexpr):
    """Wait until the kernel before has finished and its writes are visible, then let the kernel after
    this one start launching (it waits in turn before it reads what this one writes). Nothing when the
    kernel is launched plainly."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def row_blocks(t: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
    """A TMA descriptor of t [N, R, W] (last dim contiguous) read in [1, rows, cols] blocks. Blocks
    that cross R or W load zeros there and drop what is stored or added there, so a kernel needs no
    masks at the ends of a sequence."""
    return TensorDescriptor.from_tensor(t, [1, rows, cols])


def summary_blocks(summaries: torch.Tensor, rows: int) -> TensorDescriptor:
    """row_blocks of summaries [B, H, CS, d] as [B·H, CS, d]. A sequence shorter than one chunk has no
    summaries (CS 0), which no descriptor can describe: it gets one row of zeros, never read."""
    if summaries.shape[2] == 0:
        summaries = summaries.new_zeros(*summaries.shape[:2], 1, summaries.shape[3])
    return row_blocks(summaries.flatten(0, 1), rows, summaries.shape[3])


@triton.jit
def chunk_tile(pid_c, pid_bh, bias_ptr, H: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr,
               NCH: tl.constexpr):
    """Where one program of the sequential recurrence kernels works: (batch (int64), its NCH chunks,
    half-columns, k's columns (head h reads group h mod G), v/f's columns, the gate bias halves)."""
    b, h = pid_bh // H, pid_bh % H
    chunks = pid_c * NCH + tl.arange(0, NCH)
    cols = tl.arange(0, HALF)
    kc = (h % G) * (2 * HALF) + cols
    vc = h * (2 * HALF) + cols
    bias1 = tl.load(bias_ptr + vc).to(tl.float32)
    bias2 = tl.load(bias_ptr + vc + HALF).to(tl.float32)
    return b.to(tl.int64), chunks, cols, kc, vc, bias1, bias2


@triton.jit
def first_chunk(offset_ptr, b):
    """Global index of sequence b's first chunk: 0, or read from offset_ptr [B] (int32) when the
    sequence is one block of a longer one (context parallelism)."""
    if offset_ptr is None:
        return 0
    else:
        return tl.load(offset_ptr + b)


@triton.jit
def document_start(doc_ptr, b, chunk, C, mask):
    """Over packed documents: the global index of the chunk where the document of each local `chunk` of
    sequence b starts, read from doc_ptr [B, C] (int32). Its summaries are the first a query of the document
    sees, and RoPE's chunk index counts from it."""
    return tl.load(doc_ptr + b * C + chunk, mask=mask, other=0)


@triton.jit
def token_rows(start_ptr, b, slots, T, n_tok, C, L: tl.constexpr):
    """The token row of each of sequence b's slots (< T) and whether one is there. Without packed documents
    (start_ptr None) the slots are the rows. Over packed documents slot c·L + l is the l-th token of chunk c,
    which starts at token start_ptr[b, c] ([B, C] int32) and ends where chunk c + 1 starts (the last at n_tok,
    the sequence's length): the kernels read and write the tokens in place, the slots past a chunk's end
    read zeros and write nothing."""
    if start_ptr is None:
        return slots, slots < T
    else:
        chunk = slots // L
        start = tl.load(start_ptr + b * C + chunk, mask=chunk < C, other=n_tok)
        end = tl.load(start_ptr + b * C + chunk + 1, mask=chunk + 1 < C, other=n_tok)
        rows = start + slots % L
        return rows, rows < end


@triton.jit
def document_summaries(doc_ptr, b, t0, T, L: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr, j_full):
    """Over packed documents, for the query rows [t0, t0 + BQ) (whole chunks) of sequence b: j_lo, the first
    block of BC summaries any row sees (its first row's document start), and j_doc (<= j_full), from which
    every row's document start lets it see every summary (its last row's, rounded up to BC)."""
    C = T // L
    first_row = tl.load(doc_ptr + b * C + t0 // L)
    last_row = tl.load(doc_ptr + b * C + tl.minimum(t0 + BQ - 1, T - 1) // L)
    return first_row // BC * BC, tl.minimum(tl.cdiv(last_row, BC) * BC, j_full)


@triton.jit
def dot(a, b, DT: tl.constexpr, F32: tl.constexpr):
    """a @ b with fp32 accumulation; operands cast to DT, or fp32 (IEEE) when F32."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def state_step(ks, vs, f_ptrs, k_ptrs, v_ptrs, bias, mask):
    """One position of the in-chunk recurrences for a tile of chunks [chunks, HALF] (fp32).

    g = sigmoid(f + bias); k̃ = g k̃_prev + (1-g) k, ṽ likewise. Starting from zero states at
    l = 0 is the reset. Returns g, k, v, k̃, ṽ; masked rows are zero inputs.
    """
    g = tl.sigmoid(tl.load(f_ptrs, mask=mask, other=0.0).to(tl.float32) + bias[None, :])
    k = tl.load(k_ptrs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
    return g, k, v, g * ks + (1 - g) * k, g * vs + (1 - g) * v


@triton.jit
def rope_cos_sin(chunk, inv_freq):
    """cos, sin [BQ, HALF] of chunk index x inverse frequency, in fp32 (as ratpt.ops.rope)."""
    angle = chunk.to(tl.float32)[:, None] * inv_freq[None, :]
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def join_halves(a, b, ROWS: tl.constexpr, HALF: tl.constexpr):
    """[ROWS, HALF] x 2 -> [ROWS, 2·HALF]: the full-width tile that one dot can take."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (ROWS, 2 * HALF))


@triton.jit
def split_halves(x, ROWS: tl.constexpr, HALF: tl.constexpr):
    """Inverse of join_halves: the (real, imaginary) halves of a full-width tile."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, HALF)), (0, 2, 1)))
