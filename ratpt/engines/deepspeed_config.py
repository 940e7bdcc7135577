"""The DeepSpeed JSON of a ratpt run, generated from the ratpt config (never hand-written).

    batch         micro-batch per rank, accumulation steps and the global batch, in sequences;
                  DeepSpeed's data-parallel size is world / parallel.context (CP ranks share a batch)
    optimizer     AdamW with optimizer.* (lr is set every step by the ratpt schedule); torch's
                  AdamW unless the optimizer state is offloaded on a GPU machine, where
                  DeepSpeed's CPU Adam (a JIT-built extension) is the point of offloading
    clipping      gradient_clipping = optimizer.grad_clip, applied inside DeepSpeed's ZeRO step
    zero          deepspeed.zero_stage, CPU offload of optimizer state / parameters
    precision     bf16 (DeepSpeed's: bf16 weights and compute, fp32 master weights, optimizer
                  state and gradient accumulation) when train.precision says so, else fp32

`deepspeed.extra` is merged over the result key by key (nested dicts merge, anything else
replaces), so any DeepSpeed option can be set from the ratpt config, except those the ratpt
config owns (ratpt.config.DEEPSPEED_OWNED): the trainer's loop, schedule and logging follow
those, so a second value in the DeepSpeed JSON would silently disagree with them.
"""
from __future__ import annotations

import copy
from typing import Any

from ratpt.config import Config, check_deepspeed_extra
from ratpt.engines.loss import uses_bf16

QUIET_STEPS = 2**31 - 1  # steps_per_print: ratpt's metrics logger reports, DeepSpeed stays quiet


def deepspeed_json(cfg: Config, micro_batches: int, dp_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` with `micro_batches` per step on each of `dp_size`
    data-parallel ranks of `device_type`."""
    t, o, z = cfg.train, cfg.optimizer, cfg.deepspeed
    on_gpu = device_type == "cuda"
    cpu_adam = z.offload_optimizer and on_gpu
    adam: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                            "torch_adam": not cpu_adam}
    if on_gpu and not cpu_adam:
        adam["fused"] = True  # torch's fused CUDA AdamW on the flat fp32 partitions; no JIT build
    zero: dict[str, Any] = {"stage": z.zero_stage}
    if on_gpu:  # NOTE: reductions (and ZeRO-3's gathers) of buckets on a side stream during backward
        zero["overlap_comm"] = cfg.parallel.overlap_communication
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    generated: dict[str, Any] = {
        "train_batch_size": t.micro_batch * micro_batches * dp_size,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": uses_bf16(t.precision, device_type)},
        "steps_per_print": QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    if generated["bf16"]["enabled"]:
        generated["data_types"] = {"grad_accum_dtype": "fp32"}
    check_deepspeed_extra(z.extra)
    return merged(generated, z.extra)


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in: nested dicts key by key, any other value replaces."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
