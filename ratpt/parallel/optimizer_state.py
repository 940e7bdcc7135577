"""Layout-independent state of megatron's (distributed) optimizer, by parameter name.

`gather_optimizer_state` returns {parameter name: {"step", "exp_avg", "exp_avg_sq", "param"}} with
tensors of the parameter's size on this rank, whatever the data/context-parallel sharding of the
distributed optimizer (ZeRO-1). "param" is the master weight, the fp32 tensor the optimizer
updates: with bf16 training megatron keeps it beside the bf16 model parameter (an fp32 copy, or
this rank's shard of one), and it is the weight a checkpoint must hold, since the bf16 parameter
is only its rounding. Tensor-parallel shards are then assembled by
`tensor_parallel.to_plain` and pipeline stages merged by the engine;
`scatter_optimizer_state` loads such a dict into any other sharding, so a checkpoint written by
one DP × CP layout resumes in another.

NOTE: the shards are assembled with one all-reduce per parameter over the optimizer's
data-parallel group: simple and exact, fine for the tiny models of the tests and for
checkpoints of moderate models, but O(parameters) memory on every rank. Large models write
`checkpoint.format=distributed` instead (ratpt/engines/megatron_checkpoint.py), where every rank
saves only what `local_optimizer_state` gives it.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
MASTER = "param"  # the master weight's key, as in megatron's own per-parameter state


def _main_param(param: nn.Parameter) -> torch.Tensor:
    """The tensor a non-distributed megatron optimizer updates for `param`: the fp32 copy of a bf16
    parameter (Float16OptimizerWithFloat16Params sets `main_param`), else the parameter itself."""
    main = getattr(param, "main_param", None)
    return param if main is None else main


def owning_optimizer(optimizer, param: nn.Parameter):
    """(the megatron optimizer of the chain that updates `param`, whether it is distributed)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in optimizer.chained_optimizers:
        if isinstance(opt, DistributedOptimizer):
            if any(param in buffer.param_index_map for buffer in opt.buffers):
                return opt, True
        elif any(_main_param(param) is p for g in opt.optimizer.param_groups for p in g["params"]):
            return opt, False
    raise KeyError("a model parameter is not in the optimizer")


def local_optimizer_state(opt, distributed: bool, param: nn.Parameter):
    """(this rank's state of its shard of `param`: the master weight under MASTER and, once the optimizer
    has stepped, the moments and step; or None if it owns none of it), the slice of the flat parameter
    it covers)."""
    if distributed:
        if param not in opt.model_param_group_index_map:
            return None, None
        rng = opt._get_model_param_range_map(param)["param"]
        return opt._get_main_param_and_optimizer_states(param), slice(rng.start, rng.end)
    main = _main_param(param)
    return {MASTER: main, **opt.optimizer.state.get(main, {})}, slice(0, param.numel())


def gather_optimizer_state(named_parameters: Iterable[tuple[str, nn.Parameter]], optimizer, group,
                           moments: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Full master weights and (with `moments`) AdamW moments of every (name, parameter) of this rank's model
    part, identical on every rank of `group` (the optimizer's data-parallel group). Collective: every rank
    of `group` calls it."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    keys = (MASTER, *ADAM_KEYS) if moments else (MASTER,)
    for name, param in named_parameters:
        opt, distributed = owning_optimizer(optimizer, param)
        state, where = local_optimizer_state(opt, distributed, param)
        full = torch.zeros(len(keys), param.numel(), dtype=torch.float32, device=param.device)
        step = torch.zeros(1, dtype=torch.float32, device=param.device)
        if state is not None:
            full[0, where] = state[MASTER].detach().float().view(-1)
            if moments and "exp_avg" in state:
                for i, key in enumerate(ADAM_KEYS, start=1):
                    full[i, where] = state[key].detach().float().view(-1)
                step[0] = float(state["step"])
        if distributed:
            dist.all_reduce(full, group=group)
            dist.all_reduce(step, group=group, op=dist.ReduceOp.MAX)
        out[name] = {"step": step[0].clone(), **{key: full[i].view_as(param).cpu() for i, key in enumerate(keys)}}
    return out


def scatter_optimizer_state(named_parameters: Iterable[tuple[str, nn.Parameter]], optimizer,
                            state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load full moments and master weights (from `gather_optimizer_state`, a checkpoint or a
    single-process run) into this rank's shards, for every (name, parameter) of this rank's model part
    (all its pipeline chunks at once). The model parameters themselves are the caller's to set."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    named_parameters = list(named_parameters)
    for opt in optimizer.chained_optimizers:
        if isinstance(opt, DistributedOptimizer):
            opt._init_optimizer_states_with_dummy_values()
    for name, param in named_parameters:
        saved = state[name]
        opt, distributed = owning_optimizer(optimizer, param)
        if not distributed:
            opt.optimizer.state[_main_param(param)] = {"step": saved["step"].clone().float().reshape(()),
                                                       **{k: saved[k].clone().to(param.device) for k in ADAM_KEYS}}
            continue
        tensors, where = local_optimizer_state(opt, True, param)
        if tensors is None:
            continue
        for key in ADAM_KEYS:
            tensors[key].copy_(saved[key].reshape(-1)[where].view_as(tensors[key]))
        if torch.is_tensor(tensors.get("step")):
            tensors["step"].fill_(float(saved["step"]))
    load_master_weights(named_parameters, optimizer, {name: saved[MASTER] for name, saved in state.items()})


def load_master_weights(named_parameters: Iterable[tuple[str, nn.Parameter]], optimizer,
                        weights: dict[str, torch.Tensor]) -> None:
    """Set the master weight of every (name, parameter) to `weights[name]` (this rank's part, fp32):
    megatron copies its masters from the bf16 parameters, which would round the initial weights."""
    for name, param in named_parameters:
        opt, distributed = owning_optimizer(optimizer, param)
        state, where = local_optimizer_state(opt, distributed, param)
        if state is not None:
            with torch.no_grad():
                state[MASTER].copy_(weights[name].reshape(-1)[where].view_as(state[MASTER]))
