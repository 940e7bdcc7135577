"""Every RAT kernel compiles for sm_90 (H100/H200), checked on CPU-only machines too.

The interpreter tests check what the kernels compute but never run Triton's compiler, so a kernel
that the GPU compiler rejects (a type it cannot unify, an unsupported construct) would pass them.
Here Triton compiles each kernel to a cubin for Hopper through the kernels' own entry points
(compile_for_hopper.py, in a process of its own without the interpreter).
"""
import os
import subprocess
import sys

from run_helpers import REPO

KERNELS = ("_states_kernel", "_attention_kernel", "_gate_kernel", "_prepare_kernel", "_summary_grad_kernel",
           "_query_grad_kernel", "_recurrence_grad_kernel", "_decode_kernel")
SERVING = ("_decode_linear_kernel", "_decode_linear_reduce", "_attention_decode_split", "merge_splits")


# Two processes compile in parallel; fp32's IEEE dots compile about twice as slowly as bf16's, so the
# fp32 deterministic pass runs beside bf16's (81 s on 2 cores, against 90 s for fp32 alone before). Packed
# documents compile in bf16 only, the GPU training path (their deterministic backward is not compiled here).
PROCESSES = (["bfloat16:full,deterministic,context,decode", "float32:deterministic"],
             ["float32:full,context,decode", "bfloat16:documents,serving"])


def compiled_by_dtype(stdout: str) -> dict[str, list[tuple[str, int]]]:
    """(kernel, cubin bytes) per launch, by dtype, from compile_for_hopper.py's output."""
    launches: dict[str, list[tuple[str, int]]] = {}
    dtype = None
    for line in stdout.splitlines():
        if line.startswith("dtype "):
            dtype = line.split()[1]
        elif line.startswith("compiled "):
            _, name, size = line.split()
            launches.setdefault(dtype, []).append((name, int(size)))
    return launches


def test_every_kernel_compiles_to_a_hopper_cubin(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(REPO), TRITON_DEFAULT_FP_FUSION="1")
    script = str(REPO / "tests" / "kernels" / "workers" / "compile_for_hopper.py")
    runs = [subprocess.Popen([sys.executable, script, *jobs], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for jobs in PROCESSES]
    launches: dict[str, list[tuple[str, int]]] = {}
    for jobs, run in zip(PROCESSES, runs):
        stdout, stderr = run.communicate(timeout=900)
        assert run.returncode == 0 and "DONE" in stdout, f"{jobs}: {stdout[-2000:]}{stderr[-4000:]}"
        for dtype, compiled in compiled_by_dtype(stdout).items():
            launches.setdefault(dtype, []).extend(compiled)
    for dtype in ("bfloat16", "float32"):
        compiled = launches.get(dtype, [])
        for kernel in KERNELS + (SERVING if dtype == "bfloat16" else ()):
            sizes = [size for name, size in compiled if name == kernel]
            assert sizes and min(sizes) > 0, f"{dtype}: {kernel} was not compiled: {compiled}"
        # forward 3 launches (states, attention, output gate); backward 4 (states, prepare with the gate, the
        # summary side with atomic dq, the token-local rest) and deterministic 5 (+ the query side, without
        # the gate); the passes with chunk offsets 1 + 1 + 2 + 2; decode 1, and 2 with the slots split (the
        # merge) by FMAs and 2 more by dots; bf16 over packed documents 3 + 4, and serving (as programmatic dependents): decode_linear's
        # tensor-core tile three times (norm + SwiGLU + residual, GELU alone, norm + residual split over K with
        # its reduce) and its FMA rows twice (norm + SwiGLU + residual at one row, norm + GELU split over K at
        # three with its reduce), attention_decode's split and merge by FMAs and again by dots
        assert len(compiled) == {"bfloat16": 41, "float32": 23}[dtype], f"{dtype}: {compiled}"
