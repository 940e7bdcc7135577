"""GPU kernel time of a step by kernel name (torch.profiler), and summed into the categories every
profile of benchmarks/ reports: matmul, RAT mixing, attention, glue, optimizer, communication, data."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

CATEGORIES = ("matmul", "rat_mixing", "attention", "glue", "optimizer", "communication", "data")
ATTENTION = ("flash", "fmha", "sdpa", "cudnn", "attention", "efficient")
MATMUL = ("decode_linear", "gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "splitk", "sm90_", "sm80_",
          "sm100_")
OPTIMIZER = ("multi_tensor_apply", "adam", "lpnorm", "foreach")


def rat_kernel_names() -> set[str]:
    """Names of RAT's Triton kernels in kernels/ (the profiler reports a Triton kernel by its name); the
    attention decode kernel's count as attention, the decode linears' as matmul."""
    import importlib
    import pkgutil

    import triton

    import ratpt_kernels

    names = set()
    for info in pkgutil.iter_modules(ratpt_kernels.__path__):
        if info.name in ("attention_decode", "decode_linear"):
            continue
        module = importlib.import_module(f"ratpt_kernels.{info.name}")
        names |= {name for name, obj in vars(module).items() if isinstance(obj, triton.runtime.JITFunction)}
    return names


def category(name: str, rat_names: set[str]) -> str:
    lower = name.lower()
    if "nccl" in lower:
        return "communication"
    if name.split("(")[0].strip() in rat_names:
        return "rat_mixing"
    if "memcpy htod" in lower:
        return "data"
    if any(key in lower for key in ATTENTION):
        return "attention"
    if any(key in lower for key in MATMUL):
        return "matmul"
    if any(key in lower for key in OPTIMIZER):
        return "optimizer"
    return "glue"


def by_category(per_kernel: dict[str, float], rat_names: set[str]) -> dict[str, float]:
    """GPU time per kernel name, summed into CATEGORIES."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for name, ms in per_kernel.items():
        totals[category(name, rat_names)] += ms
    return totals


def kernel_times(fn, iters: int, launches: dict[str, float] | None = None) -> dict[str, float]:
    """Mean GPU milliseconds per call of fn, by kernel name, longest first; `launches`, if given, gets the
    launches per call by name (at a few rows a step's kernel count, not its bytes, sets its time)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            totals[event.name] += event.device_time / 1000 / iters
            if launches is not None:
                launches[event.name] = launches.get(event.name, 0) + 1 / iters
    return dict(sorted(((name, round(ms, 3)) for name, ms in totals.items()), key=lambda item: -item[1]))
