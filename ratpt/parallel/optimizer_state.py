"""Layout-independent AdamW state of megatron's (distributed) optimizer, by parameter name.

`gather_adam_state` returns {parameter name: {"step", "exp_avg", "exp_avg_sq"}} with tensors of
the parameter's size on this rank, whatever the data/context-parallel sharding of the
distributed optimizer (ZeRO-1); tensor-parallel shards are then assembled by
`tensor_parallel.to_plain` and pipeline stages merged by the engine;
`scatter_adam_state` loads such a dict into any other sharding, so a checkpoint written by
one DP × CP layout resumes in another.

NOTE: the shards are assembled with one all-reduce per parameter over the optimizer's
data-parallel group: simple and exact, fine for the tiny models of the tests and for
checkpoints of moderate models, but O(parameters) memory on every rank. Large models write
`checkpoint.format=distributed` instead (ratpt/parallel/dist_checkpoint.py), where every rank
saves only what `local_adam_state` gives it.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def owning_optimizer(optimizer, param: nn.Parameter):
    """(the megatron optimizer of the chain that updates `param`, whether it is distributed)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in optimizer.chained_optimizers:
        if isinstance(opt, DistributedOptimizer):
            if any(param in buffer.param_index_map for buffer in opt.buffers):
                return opt, True
        elif any(param is p for g in opt.optimizer.param_groups for p in g["params"]):
            return opt, False
    raise KeyError("a model parameter is not in the optimizer")


def local_adam_state(opt, distributed: bool, param: nn.Parameter):
    """(this rank's state of its shard of `param`, or None; the slice of the flat parameter it covers)."""
    if distributed:
        if param not in opt.model_param_group_index_map:
            return None, None
        rng = opt._get_model_param_range_map(param)["param"]
        return opt._get_main_param_and_optimizer_states(param), slice(rng.start, rng.end)
    return opt.optimizer.state.get(param), slice(0, param.numel())


def gather_adam_state(named_parameters: Iterable[tuple[str, nn.Parameter]], optimizer, group
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """Full AdamW moments of every (name, parameter) of this rank's model part, identical on every
    rank of `group` (the optimizer's data-parallel group). Collective: every rank of `group` calls it."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in named_parameters:
        opt, distributed = owning_optimizer(optimizer, param)
        state, where = local_adam_state(opt, distributed, param)
        moments = torch.zeros(2, param.numel(), dtype=torch.float32, device=param.device)
        step = torch.zeros(1, dtype=torch.float32, device=param.device)
        if state is not None and "exp_avg" in state:
            for i, key in enumerate(ADAM_KEYS):
                moments[i, where] = state[key].detach().float().view(-1)
            step[0] = float(state["step"])
        if distributed:
            dist.all_reduce(moments, group=group)
            dist.all_reduce(step, group=group, op=dist.ReduceOp.MAX)
        out[name] = {"step": step[0].clone(), "exp_avg": moments[0].view_as(param).cpu(),
                     "exp_avg_sq": moments[1].view_as(param).cpu()}
    return out


def scatter_adam_state(named_parameters: Iterable[tuple[str, nn.Parameter]], optimizer,
                       state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load full moments (from `gather_adam_state` or a single-process run) into this rank's shards,
    for every (name, parameter) of this rank's model part (all its pipeline chunks at once)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in optimizer.chained_optimizers:
        if isinstance(opt, DistributedOptimizer):
            opt._init_optimizer_states_with_dummy_values()
    for name, param in named_parameters:
        saved = state[name]
        opt, distributed = owning_optimizer(optimizer, param)
        if not distributed:
            opt.optimizer.state[param] = {"step": saved["step"].clone().float().reshape(()),
                                          **{k: saved[k].clone().to(param.device) for k in ADAM_KEYS}}
            continue
        tensors, where = local_adam_state(opt, True, param)
        if tensors is None:
            continue
        for key in ADAM_KEYS:
            tensors[key].copy_(saved[key].reshape(-1)[where].view_as(tensors[key]))
        if torch.is_tensor(tensors.get("step")):
            tensors["step"].fill_(float(saved["step"]))
