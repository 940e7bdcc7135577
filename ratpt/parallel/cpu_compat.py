"""Run megatron-core 0.16 on CPU processes (gloo): redirect its hard-coded CUDA calls.

megatron-core allocates communication buffers, token counters and norms with
`device="cuda"` / `torch.cuda.current_device()`, uses CUDA streams for overlapped reduction and
checks `param.type() == "torch.cuda.FloatTensor"` in the optimizer. Nothing in it needs a GPU
otherwise, so on a machine without CUDA `install()` swaps the `torch` name inside exactly those
modules for a view of torch whose CUDA device is the CPU, and makes the optimizer's two type checks
accept CPU tensors.

Active only when CUDA is absent (CI, laptops); on a GPU `install()` does nothing and megatron
runs unmodified. Idempotent. tests/parallel/test_cpu_compat.py pins what it changes.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

# The megatron-core modules that name the CUDA device directly (each is given the CPU view).
PATCHED_MODULES = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    # dist_checkpointing: the D2H staging, the async callers' done-flags and the save finalization
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like", "ones_like")
_installed = False


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or (
            isinstance(device, torch.device) and device.type == "cuda"):
        return torch.device("cpu")
    return device


def _on_cpu(factory):
    @functools.wraps(factory)
    def make(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return make


class _NoStream:
    """Stands in for a CUDA stream: work on CPU is synchronous, so waiting is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


def _cpu_cuda_namespace() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        current_device=lambda: torch.device("cpu"),
        is_available=lambda: False,
        device_count=lambda: 0,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        Stream=_NoStream,
        current_stream=lambda *a, **k: _NoStream(),
        default_stream=lambda *a, **k: _NoStream(),
        stream=lambda s: contextlib.nullcontext(),
        nvtx=types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None),
        amp=torch.amp,
        get_rng_state=torch.get_rng_state,
        set_rng_state=torch.set_rng_state,
        manual_seed=torch.manual_seed,
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
    )


class _TorchOnCpu(types.ModuleType):
    """`torch`, except that the CUDA device is the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _cpu_cuda_namespace()
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_TENSOR_TYPE = torch.Tensor.type  # the real method, captured before any patching


def _cuda_type_name(tensor: torch.Tensor) -> str:
    """'torch.cuda.FloatTensor' for a CPU float32 tensor: what the optimizer's checks expect."""
    name = _TENSOR_TYPE(tensor)
    return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)


def _type_reporting_cuda(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs:
        return _cuda_type_name(self)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def _cpu_tensors_pass_cuda_type_checks():
    """While megatron's optimizer is built or clips, `tensor.type()` names CPU tensors as CUDA ones."""
    outermost = torch.Tensor.type is _TENSOR_TYPE
    torch.Tensor.type = _type_reporting_cuda
    try:
        yield
    finally:
        if outermost:
            torch.Tensor.type = _TENSOR_TYPE


def _with_type_checks_relaxed(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _cpu_tensors_pass_cuda_type_checks():
            return fn(*args, **kwargs)

    return run


def needed() -> bool:
    return not torch.cuda.is_available()


def install() -> bool:
    """Redirect megatron-core's CUDA calls to the CPU if there is no GPU; True if it did."""
    global _installed
    if _installed or not needed():
        return _installed
    cpu_torch = _TorchOnCpu()
    for name in PATCHED_MODULES:
        importlib.import_module(name).torch = cpu_torch
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    # The two places that test `param.type()` against CUDA tensor type names.
    dist_opt = distrib_optimizer.DistributedOptimizer
    dist_opt.__init__ = _with_type_checks_relaxed(dist_opt.__init__)
    dist_opt._build_model_and_main_param_groups = staticmethod(
        _with_type_checks_relaxed(dist_opt._build_model_and_main_param_groups))
    clip = _with_type_checks_relaxed(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = optimizer.clip_grad_by_total_norm_fp32 = clip
    optimizer.Float16OptimizerWithFloat16Params.__init__ = _with_type_checks_relaxed(
        optimizer.Float16OptimizerWithFloat16Params.__init__)
    _installed = True
    return True
