"""Compile every RAT kernel for sm_90 (H100/H200) on a machine without a GPU; run by
test_compile_for_hopper.py in a process of its own (the Triton interpreter must be off).

Triton's real compiler runs (frontend, MLIR passes, ptxas to a cubin); only the question "which GPU
is this?" is answered by a stand-in driver, and every launch is turned into a warmup (compile
only). The kernels are reached through their Python entry points, with the launch configurations
kernels/blocks.py gives on a GPU, so what is compiled is what a GPU run would compile.
Usage: compile_for_hopper.py DTYPE:PASS,PASS [DTYPE:PASS ...] (bfloat16: tensor-core dots; float32:
IEEE fp32 dots; passes: PASSES below). Prints "dtype DTYPE" before each job, one line per launch,
"compiled NAME BYTES" (the cubin's size), then "DONE".
"""
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import jit

HOPPER = GPUTarget("cuda", 90, 32)


class HopperWithoutDevice:
    """The part of Triton's driver interface that compiling needs."""

    def get_current_target(self):
        return HOPPER

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def compile_instead_of_launching() -> None:
    launch = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        print("compiled", self.__name__, len(kernel.asm["cubin"]), flush=True)
        return kernel

    jit.JITFunction.run = run


PASSES = ("full", "deterministic", "context", "decode", "documents", "serving")


def compile_passes(dtype: torch.dtype, passes: list[str]) -> None:
    """Every kernel of `passes` (of PASSES) through its entry points at one small shape (d 128, L 16,
    G 2), in `dtype`. Launches only compile, so no pass needs another's outputs: it gets tensors of
    the right shapes and dtypes."""
    from ratpt_kernels.autograd import split_projection
    from ratpt_kernels.rat_bwd import input_gradients, rat_backward, summary_gradients
    from ratpt_kernels.rat_decode import rat_decode
    from ratpt_kernels.rat_fwd import rat_forward, rat_states, summary_attention

    H, G, d, L = 4, 2, 128, 16
    B, T, base = 2, 256, 10000.0
    proj = torch.randn(B, T, 3 * H * d + 2 * G * d).to(dtype)
    z, v, f, q, k = split_projection(proj, d, G)
    bias, dy = torch.zeros(H * d), torch.randn(B, T, H * d).to(dtype)
    y, lse, ks, vs = dy.clone(), torch.randn(B, H, T), *(torch.randn(B, H, T // L, d).to(dtype) for _ in range(2))
    if "full" in passes:  # as the model runs it: with the output gate, gradients into one projection gradient
        y, lse, ks, vs = rat_forward(q, k, v, f, bias, L, d, base, gate=z)
        dz, dv, df, dq, dk = split_projection(torch.empty_like(proj), d, G)
        rat_backward(dy, q, k, v, f, bias, y, lse, ks, vs, L, d, base, gate=(z, dz), out=(dq, dk, dv, df))
    if "deterministic" in passes:
        rat_backward(dy, q, k, v, f, bias, y, lse, ks, vs, L, d, base, atomic_dq=False)
    if "context" in passes:  # one block of a longer sequence: chunk offsets and the sequence's summaries
        offset = torch.tensor([0, 3], dtype=torch.int32)
        kst, vst, _, _ = rat_states(k, v, f, bias, L, d, base, chunk_offset=offset)
        seq_k, seq_v = (torch.randn(B, H, 3 + T // L, d).to(dtype) for _ in range(2))
        y, lse = summary_attention(q, kst, vst, seq_k, seq_v, L, d, base, chunk_offset=offset)
        dks, dvs, reused = summary_gradients(dy, q, y, lse, seq_k, seq_v, L, d, base, chunk_offset=offset)
        input_gradients(q, k, v, f, bias, lse, seq_k, seq_v, reused, dks[:, :, 3:], dvs[:, :, 3:], L, d, base,
                        chunk_offset=offset)
    if "documents" in passes:  # packed documents read in place through their chunk table, as "full" runs
        first_chunk = torch.tensor([0, 0, 2, 3, 3, 3, 3, 3, 3, 3, 10, 10, 12, 13, 13, 13], dtype=torch.int32)
        chunk_start = torch.tensor([0, 16, 20, 30, 46, 62, 78, 94, 110, 126, 140, 156, 170, 190, 206, 222],
                                   dtype=torch.int32)
        documents = (first_chunk.expand(B, -1).contiguous(), chunk_start.expand(B, -1).contiguous())
        y, lse, ks, vs = rat_forward(q, k, v, f, bias, L, d, base, gate=z, documents=documents)
        dz, dv, df, dq, dk = split_projection(torch.empty_like(proj), d, G)
        rat_backward(dy, q, k, v, f, bias, y, lse, ks, vs, L, d, base, gate=(z, dz), out=(dq, dk, dv, df),
                     documents=documents)
    if "serving" in passes:  # a decode step's other kernels: norm + linear + activation + residual in one, and
        # attention over the valid slots of a cache, split over the slots (by FMAs and by tensor-core dots) and
        # merged (ratpt.ops), each launched as a programmatic dependent as on a Hopper GPU
        from ratpt_kernels.attention_decode import attention_decode
        from ratpt_kernels.decode_linear import decode_linear
        # 16 rows take the tensor-core tile: norm + SwiGLU + residual, GELU alone, norm + residual split over K
        # (and its reduce); one and three rows the FMA path: everything at one, norm + GELU split at three
        rows, w, g = 16, torch.randn(2 * 256, H * d).to(dtype), torch.ones(H * d).to(dtype)
        x = torch.randn(rows, H * d).to(dtype)
        decode_linear(x, w, g, 1e-5, "swiglu", torch.randn(rows, 256).to(dtype), pdl=True)
        decode_linear(x, w, None, 1e-5, "gelu", None, pdl=True)
        decode_linear(x, w, g, 1e-5, "none", torch.randn(rows, 2 * 256).to(dtype), block_k=64, split=2, pdl=True)
        decode_linear(x[:1], w, g, 1e-5, "swiglu", torch.randn(1, 256).to(dtype), pdl=True)
        decode_linear(x[:3], w, g, 1e-5, "gelu", None, block_k=64, split=2, pdl=True)
        cache = torch.randn(B, H, 512, d).to(dtype)
        query = q[:, :1].reshape(B, 1, G, d).repeat(1, 1, H // G, 1).transpose(1, 2).contiguous()
        for dots in (False, True):  # FMA products, then tensor-core dots
            attention_decode(query, cache, cache.clone(), torch.full((B,), 300), splits=4, pdl=True, dots=dots)
    if "decode" in passes:  # one program per (sequence, head), launched plainly; the small-batch launch: the
        # slots split over 2 programs, merged with the output gate, as programmatic dependents; and that launch
        # with the summary products as tensor-core dots
        cache = torch.zeros(B, H, 80, d).to(dtype)
        step = [*(t[:, 0].contiguous() for t in (q, k, v, f)), bias]
        rat_decode(*step, cache, cache.clone(), torch.zeros(B, H * d), torch.zeros(B, H * d), torch.full((B,), 100),
                   L, d, base)
        rat_decode(*step, cache, cache.clone(), torch.zeros(B, H * d), torch.zeros(B, H * d), torch.full((B,), 100),
                   L, d, base, gate=z[:, 0].contiguous(), splits=2, pdl=True)
        rat_decode(*step, cache, cache.clone(), torch.zeros(B, H * d), torch.zeros(B, H * d), torch.full((B,), 100),
                   L, d, base, gate=z[:, 0].contiguous(), splits=2, pdl=True, dots=True)

if __name__ == "__main__":
    triton.runtime.driver.set_active(HopperWithoutDevice())
    compile_instead_of_launching()
    for job in sys.argv[1:]:  # DTYPE:PASS,PASS ...
        dtype, passes = job.split(":")
        print("dtype", dtype, flush=True)
        compile_passes(getattr(torch, dtype), passes.split(","))
    print("DONE", flush=True)
