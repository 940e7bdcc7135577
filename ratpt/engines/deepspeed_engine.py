"""One training step through DeepSpeed ZeRO (`train.engine: deepspeed`), the alternative to
megatron-core for runs that scale by data (and context) parallelism, or need ZeRO-3 / offload.

    groups            CP ranks are adjacent (rank = dp_rank · CP + cp_rank, as in megatron's mesh);
                      DeepSpeed is handed them through its `mpu` protocol: its "sequence parallel"
                      group is our CP group, its data-parallel group our DP group (which selects
                      the sequences a rank reads), and ZeRO shards and reduces over DP × CP
    parallelize       each mixer gets its `ContextShard` (ratpt.parallel.context_parallel); for
                      ZeRO-3, the tied head's use of the embedding weight is registered
    forward/backward  every micro-batch's loss is its token-loss sum over the global number of
                      labelled tokens, times the DP size that DeepSpeed divides gradients by: the
                      step's loss and gradients are those of one process on the whole global batch
    clip, step        the gradient norm is DeepSpeed's own (over the reduced ZeRO partitions);
                      DeepSpeed clips (gradient_clipping) and runs AdamW in its ZeRO step
    checkpoints       DeepSpeed's save/load (ratpt.engines.deepspeed_checkpoint)

The DeepSpeed JSON is generated from the ratpt config (ratpt.engines.deepspeed_config).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ratpt.config import Config, micro_batches_per_step
from ratpt.engines.deepspeed_checkpoint import load_deepspeed_checkpoint, save_deepspeed_checkpoint
from ratpt.engines.deepspeed_config import deepspeed_json
from ratpt.engines.loss import IGNORE_INDEX, sum_cross_entropy
from ratpt.engines.optim import parameter_groups
from ratpt.parallel.context_blocks import sequence_slice
from ratpt.parallel.context_parallel import apply_context_parallel
from ratpt.parallel.mesh import Mesh
from ratpt.parallel.process_group import DistributedContext, collective_timeout

log = logging.getLogger(__name__)


class DeepSpeedGroups:
    """The process groups of DP × CP, in the `mpu` protocol DeepSpeed reads (utils/groups.py)."""

    def __init__(self, cp: int) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        dp = world // cp
        self.mesh = Mesh(tp=1, pp=1, cp=cp, dp=dp, virtual_stages=1, tp_rank=0, pp_rank=0,
                         cp_rank=rank % cp, dp_rank=rank // cp)
        # NOTE: every rank creates every group, in the same order (torch.distributed's rule); a new group
        # does not inherit the world group's timeout.
        timeout = collective_timeout()
        for d in range(dp):
            group = dist.new_group([d * cp + c for c in range(cp)], timeout=timeout)
            if d == self.mesh.dp_rank:
                self.cp_group = group
        for c in range(cp):
            group = dist.new_group([d * cp + c for d in range(dp)], timeout=timeout)
            if c == self.mesh.cp_rank:
                self.dp_group = group
        self.model_group = dist.new_group([rank], timeout=timeout, use_local_synchronization=True)  # no TP/PP

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_sequence_parallel_group(self):
        return self.cp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.mesh.cp

    def get_sequence_parallel_rank(self) -> int:
        return self.mesh.cp_rank

    def get_sequence_data_parallel_group(self):
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self) -> int:
        return dist.get_world_size()

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank()

    def get_model_parallel_group(self):
        return self.model_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def import_deepspeed(device: torch.device):
    """Import DeepSpeed for `device`. On CPU: its CPU accelerator, and no shared-memory comm op
    (a ~1 minute JIT build on first use, for inference all-reduce only; training uses gloo)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if device.type == "cpu":
        # NOTE: DeepSpeed probes its ops once and keeps the dict; a False entry skips the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _join_single_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process (e.g. ZeRO offload on one GPU)."""
    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # what DeepSpeed reads from a launcher
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, timeout=collective_timeout())


class DeepSpeedEngine:
    """Forward/backward, clip and step of a DeepSpeed ZeRO engine over DP × CP."""

    def __init__(self, cfg: Config, ctx: DistributedContext, model: nn.Module,
                 compile_backend: Optional[str] = None) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.compile_backend = compile_backend
        deepspeed = import_deepspeed(ctx.device)
        _join_single_process_group(ctx.device)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)  # wraps ours
        self.groups = groups = DeepSpeedGroups(cfg.parallel.context)
        self.mesh = groups.mesh
        self.dp_rank, self.dp_size = self.mesh.dp_rank, self.mesh.dp
        if self.mesh.cp > 1:
            apply_context_parallel(model, groups.cp_group, self.mesh.cp_rank, self.mesh.cp,
                                   cfg.parallel.context_layout)
        self.config = deepspeed_json(cfg, micro_batches_per_step(cfg.train, self.dp_size), self.dp_size,
                                     ctx.device.type)
        groups_by_decay = parameter_groups(model, cfg.optimizer.weight_decay)  # before ZeRO-3 empties the tensors
        if self.config["zero_optimization"]["stage"] == 3:
            # NOTE: partition over DP × CP ourselves: DeepSpeed's own conversion would use the
            # mpu's data-parallel group, leaving CP ranks with unreduced gradients.
            deepspeed.zero.Init(module=model, data_parallel_group=dist.group.WORLD, config_dict_or_path=self.config,
                                mpu=groups)
            if hasattr(model, "embedding"):
                # NOTE: ZeRO-3 gathers a parameter around its own module's forward; the tied head
                # reads the embedding weight in the LM's forward, so it is declared there too.
                deepspeed.zero.register_external_parameter(model, model.embedding.weight)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups_by_decay,
            config=self.config, mpu=groups, dist_init_required=False,
        )
        self.model = model
        self._pending_step = False  # gradients of a step the trainer has not (yet) applied
        log.info("DeepSpeed ZeRO-%d over DP %d × CP %d, %d micro-batch(es) per step, %s",
                 self.config["zero_optimization"]["stage"], self.mesh.dp, self.mesh.cp,
                 self.config["gradient_accumulation_steps"], "bf16" if self.ds.bfloat16_enabled() else "fp32")

    # ----- the step -------------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[dict]) -> tuple[float, float]:
        """(sum of the token losses, labelled tokens) of the global batch; gradients reduced."""
        self._discard_pending_step()
        micro_batches = [self._local(b) for b in micro_batches]
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        total = self._all_ranks_sum(torch.tensor([float(local_tokens)], dtype=torch.float64))[0].item()
        scale = self._gradient_divisor() / max(total, 1.0)  # undo DeepSpeed's average: a plain sum
        totals = torch.tensor([0.0, float(local_tokens)], dtype=torch.float64, device=self.ctx.device)
        for i, batch in enumerate(micro_batches):
            self.ds.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            loss = sum_cross_entropy(self.ds, batch, self.ctx.device, "fp32",  # bf16 is DeepSpeed's
                                     self.compile_backend, self.cfg.train.fused_loss)
            self.ds.backward(loss * scale, scale_wrt_gas=False)
            totals[0] += loss.detach().double()
        self._pending_step = True
        totals = self._all_ranks_sum(totals)
        return totals[0].item(), totals[1].item()

    def _gradient_divisor(self) -> int:
        """What DeepSpeed divides the sum of the ranks' gradients by."""
        # NOTE: DeepSpeed 0.19 averages over its data-parallel ranks and sums over its sequence-
        # parallel (our CP) ranks, except in ZeRO-3's reduce-scatter (its default), which averages
        # over all DP × CP ranks. tests/engines checks every case against one process.
        zero = self.config["zero_optimization"]
        if zero["stage"] == 3 and zero.get("reduce_scatter", True):
            return self.mesh.dp * self.mesh.cp
        return self.mesh.dp

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global gradient norm before clipping (inf if non-finite). DeepSpeed clips inside
        its step, to its gradient_clipping: `optimizer.grad_clip`, the `max_norm` the trainer passes."""
        opt = self.ds.optimizer
        if hasattr(opt, "scaled_global_norm"):  # ZeRO-1/2 optimizer
            norm = opt.scaled_global_norm()
        elif hasattr(opt, "_get_norm_groups"):  # ZeRO-3
            from deepspeed.runtime.utils import combine_grad_norm_groups

            norm = combine_grad_norm_groups(opt._get_norm_groups())
        else:  # BF16_Optimizer (bf16 at stage 1 on GPU): full fp32 gradients, already all-reduced
            from deepspeed.runtime.utils import get_global_norm_of_tensors

            grads, _ = opt.get_grads_for_norm()
            norm = get_global_norm_of_tensors(grads, norm_type=opt.norm_type, mpu=opt.mpu)
        return float(norm) / float(getattr(opt, "loss_scale", 1.0))

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()
        self._pending_step = False

    def _discard_pending_step(self) -> None:
        """Gradients of a step the trainer skipped (non-finite): DeepSpeed's step sees the invalid
        norm and drops them (its overflow path) without touching parameters or optimizer state."""
        if not self._pending_step:
            return
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()
        self._pending_step = False
        if self.ds.was_step_applied():
            log.warning("DeepSpeed applied a step whose loss was non-finite but gradients finite")

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> tuple[float, float]:
        """(loss sum, labelled tokens) over all ranks of this rank's validation batches."""
        self.ds.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        try:
            for batch in batches:
                batch = self._local(batch)
                totals[0] += sum_cross_entropy(self.ds, batch, self.ctx.device, "fp32",
                                               fused=self.cfg.train.fused_loss).double().cpu()
                totals[1] += float((batch["labels"] != IGNORE_INDEX).sum())
        finally:
            self.ds.train()
        totals = self._all_ranks_sum(totals)
        return totals[0].item(), totals[1].item()

    def model_weights(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights, gathered from the ZeRO partitions (collective): what consolidation of a
        checkpoint of this step gives."""
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(p).detach().cpu() for name, p in self.model.named_parameters()}

    def _local(self, batch: dict) -> dict:
        """This CP rank's part of a batch, cut by parallel.context_layout (the batch itself without CP); the
        documents' `positions` (data.document_masking) whole, as every CP rank's mixers read them
        (docs/design.md#packed-documents)."""
        layout = self.cfg.parallel.context_layout
        local = {k: sequence_slice(batch[k], self.mesh, layout) for k in ("input_ids", "labels")}
        return {**local, "positions": batch["positions"]} if "positions" in batch else local

    def _all_ranks_sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.ctx.device)
        dist.all_reduce(values)
        return values.cpu()

    # ----- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: Path, step: int, client_state: dict[str, Any], config_yaml: str,
                        tokenizer_dir: Optional[Path], keep: int) -> Path:
        """DeepSpeed's save_checkpoint into a complete ratpt checkpoint directory (collective)."""
        return save_deepspeed_checkpoint(self.ds, ckpt_dir, step, client_state, config_yaml, tokenizer_dir, keep)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """DeepSpeed's load_checkpoint (model, optimizer); returns the client state (step, data
        position, RNG, bad-step count) saved with it."""
        return load_deepspeed_checkpoint(self.ds, path)

    def poll(self) -> None:
        """DeepSpeed saves synchronously: nothing in flight."""

    def wait(self) -> None:
        """DeepSpeed saves synchronously: nothing in flight."""
