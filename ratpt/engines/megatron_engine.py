"""One training step of a parallel layout (PP × DP × CP × TP) through megatron-core.

    forward/backward  megatron's schedule (no pipelining, or 1F1B / interleaved 1F1B for PP; one
                      DDP-wrapped model chunk per virtual stage) over the
                      step's micro-batches; the loss is summed per token and megatron's
                      `finalize_model_grads` reduces gradients over DP × CP and divides them by the
                      global number of labelled tokens (`calculate_per_token_loss`), so the step's
                      loss and gradients are those of one process on the whole global batch;
                      without TP the last stage fuses head and loss (train.fused_loss), under TP
                      it is megatron's vocab-parallel cross-entropy over the sharded logits
    clip, step        megatron's (distributed) optimizer: global grad norm over all ranks,
                      clip, AdamW on this rank's shard, all-gather of the updated parameters
    precision         megatron's mixed precision when train.precision is bf16 (auto on CUDA):
                      bf16 parameters and compute, gradients accumulated and reduced in fp32
                      (`main_grad`), fp32 master weights in the optimizer, updated there and copied
                      back rounded; so no fp32 weight is cast again in every micro-batch, as it is
                      under autocast. fp32 otherwise

The plain model is built on every rank from the same seed, turned into this rank's part by
`ratpt.parallel.parallelize`, then wrapped in megatron's DistributedDataParallel (gradient
buffers, bucketed reduce-scatter overlapped with backward on GPU).
"""
from __future__ import annotations

import logging
import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ratpt.config import Config
from ratpt.parallel.context_parallel import sequence_slice
from ratpt.parallel.data_parallel import DistributedContext
from ratpt.parallel.mesh import Mesh, init_mesh
from ratpt.parallel.optimizer_state import (ADAM_KEYS, MASTER, gather_optimizer_state, load_master_weights,
                                            scatter_optimizer_state)
from ratpt.parallel.parallelize import LayoutNotSupported, parallelize
from ratpt.parallel.pipeline import stage_layers
from ratpt.parallel.tensor_parallel import from_plain, to_plain
from ratpt.train.engine import IGNORE_INDEX, cross_entropy_sum, uses_bf16

log = logging.getLogger("ratpt.train")


def transformer_config(cfg: Config, mesh: Mesh, device: torch.device):
    """The megatron `TransformerConfig` its DDP, schedules and optimizer read (shapes, groups, flags).
    params_dtype is the dtype the TP layers are built in: fp32, so that the initial weights are exact
    until the engine has taken its fp32 copy of them; pipeline_dtype is that of the activations."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.transformer import TransformerConfig

    m = cfg.model
    bf16 = uses_bf16(cfg.train.precision, device.type)
    return TransformerConfig(
        bf16=bf16, pipeline_dtype=torch.bfloat16 if bf16 else torch.float32, params_dtype=torch.float32,
        num_layers=m.n_layers, hidden_size=m.d_model, num_attention_heads=m.d_model // m.head_dim,
        tensor_model_parallel_size=mesh.tp, pipeline_model_parallel_size=mesh.pp,
        virtual_pipeline_model_parallel_size=mesh.virtual_stages if mesh.virtual_stages > 1 else None,
        context_parallel_size=mesh.cp, sequence_parallel=mesh.tp > 1,
        use_cpu_initialization=device.type != "cuda", perform_initialization=False,
        calculate_per_token_loss=True, finalize_model_grads_func=finalize_model_grads,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        # NOTE: batched p2p puts both directions' sends to the same peer in one batch when PP = 2 (prev
        # = next), and the interleaved schedule then receives them swapped (seen on gloo). Unbatched
        # p2p, as Megatron-LM runs the interleaved schedule, sends the two directions on two groups.
        batch_p2p_comm=False,
    )


class MegatronEngine:
    """Forward/backward, clip and step of this rank's model part, via megatron-core."""

    def __init__(self, cfg: Config, ctx: DistributedContext, model: nn.Module) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.cfg, self.ctx = cfg, ctx
        self.mesh = mesh = init_mesh(cfg.parallel, ctx)
        self.dp_rank, self.dp_size = mesh.dp_rank, mesh.dp
        self.config = transformer_config(cfg, mesh, ctx.device)
        micro_batches = cfg.train.global_batch // (cfg.train.micro_batch * mesh.dp)
        if mesh.virtual_stages > 1 and micro_batches % mesh.pp:
            raise LayoutNotSupported(
                f"the interleaved schedule runs micro-batches in groups of parallel.pipeline ({mesh.pp}): "
                f"train.global_batch / (train.micro_batch × data-parallel size) = {micro_batches} must be a "
                "multiple of it (or use parallel.virtual_stages=1)")
        parallel = parallelize(model, cfg, mesh, self.config)
        self.chunks, self.placements = parallel.chunks, parallel.placements
        if ctx.is_main:
            stages = stage_layers(cfg.model, cfg.data.seq_len, mesh.pp * mesh.virtual_stages) if mesh.pp > 1 else None
            log.info("layout %s%s", mesh.describe(),
                     f"; layers of the pipeline stages (FLOP-balanced): {[[r[0], r[-1]] for r in stages]}" if stages else "")
        self.model = nn.ModuleList(self.chunks)  # this rank's parameters (names prefixed by the chunk index)
        bf16 = self.config.bf16
        initial = {n: p.detach().clone() for n, p in self.named_parameters()} if bf16 else None
        if bf16:
            self.model.to(torch.bfloat16)
        on_gpu = ctx.device.type == "cuda"
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=on_gpu,  # NOTE: overlap needs CUDA streams; on CPU the reduction is at the end
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            bucket_size=None if on_gpu else 2**62,
        )
        # One DDP per model chunk; as in Megatron-LM, only the first chunk's gradients are bucketed.
        self.ddps = [DistributedDataParallel(self.config, ddp_config, module=chunk, disable_bucketing=i > 0)
                     for i, chunk in enumerate(self.chunks)]
        for ddp in self.ddps:
            ddp.broadcast_params()
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
                            adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.grad_clip,
                            use_distributed_optimizer=cfg.parallel.distributed_optimizer, bf16=bf16,
                            params_dtype=torch.bfloat16 if bf16 else torch.float32),
            self.ddps, use_gloo_process_groups=on_gpu,
        )
        if initial is not None:
            load_master_weights(self.named_parameters(), self.optimizer, initial)
        one = len(self.ddps) == 1
        self.config.no_sync_func = self.ddps[0].no_sync if one else [d.no_sync for d in self.ddps]
        if on_gpu:
            self.config.grad_sync_func = self.ddps[0].start_grad_sync if one else [d.start_grad_sync for d in self.ddps]

    # ----- the step -------------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[dict], forward_only: bool = False) -> tuple[float, float]:
        """Run the schedule over the micro-batches; (sum of the token losses, labelled tokens), global."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not forward_only:
            for ddp in self.ddps:
                ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
        micro_batches = list(micro_batches)
        # every model chunk consumes the micro-batches in order (a pipeline stage reads its inputs/labels)
        data = [iter(micro_batches) for _ in self.ddps]
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=data if len(data) > 1 else data[0], model=self.ddps,
            num_microbatches=len(micro_batches), seq_length=self.cfg.data.seq_len,  # the schedule divides by CP, TP
            micro_batch_size=self.cfg.train.micro_batch, forward_only=forward_only,
        )
        totals = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        if self.mesh.tp_rank == 0:  # only the last pipeline stage has outputs; TP ranks hold the same ones
            for out in outputs:
                totals += out["lm loss"].to(totals)
        dist.all_reduce(totals)
        return totals[0].item(), totals[1].item()

    def _forward_step(self, data_iterator: Iterable[dict], model: nn.Module):
        batch = next(data_iterator)
        layout = self.cfg.parallel.context_layout
        input_ids = sequence_slice(batch["input_ids"], self.mesh, layout).to(self.ctx.device, non_blocking=True)
        labels = sequence_slice(batch["labels"], self.mesh, layout).to(self.ctx.device, non_blocking=True)
        # in the parameters' dtype (bf16 under mixed precision, no autocast); without TP the last stage
        # fuses head and loss (train.fused_loss) and outputs the summed loss
        fused = self.cfg.train.fused_loss and self.mesh.tp == 1
        output = model(input_ids, labels=labels) if fused else model(input_ids)

        def loss_func(output: torch.Tensor):
            labelled = labels != IGNORE_INDEX
            if fused:
                loss = output
            elif self.mesh.tp > 1:  # logits [T, B, V/TP]: megatron's vocab-parallel softmax
                from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

                target = labels.masked_fill(~labelled, 0).transpose(0, 1).contiguous()
                per_token = vocab_parallel_cross_entropy(output.float(), target)
                loss = (per_token * labelled.transpose(0, 1)).sum()
            else:
                loss = cross_entropy_sum(output, labels)
            tokens = labelled.sum()
            report = torch.stack((loss.detach().double(), tokens.double()))
            return loss, tokens.to(torch.int), {"lm loss": report}

        return output, loss_func

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global gradient norm (before clipping); gradients are clipped if it is finite."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if math.isfinite(grad_norm) and max_norm > 0:
            for opt in self.optimizer.chained_optimizers:
                params = opt.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, max_norm=max_norm, total_norm=grad_norm)
        return grad_norm

    def set_lr(self, lr: float) -> None:
        # NOTE: megatron's groups carry multipliers that its own lr scheduler applies; so do we
        # (weight decay is 0 for norms, gate biases and other vectors through wd_mult).
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.cfg.optimizer.weight_decay * group.get("wd_mult", 1.0)

    def step(self) -> None:
        self.optimizer.step_with_ready_grads()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> tuple[float, float]:
        for ddp in self.ddps:
            ddp.eval()
        try:
            return self.forward_backward(list(batches), forward_only=True)
        finally:
            for ddp in self.ddps:
                ddp.train()

    # ----- layout-independent state ---------------------------------------------------------
    def named_parameters(self):
        """(name, parameter) of this rank's part: plain-model names, TP-local shapes."""
        for chunk in self.chunks:
            yield from chunk.named_parameters()

    def state_dict(self) -> dict:
        """Full model (the master weights: fp32 under mixed precision) and AdamW moments by plain parameter
        name (collective: every rank calls it): DP × CP shards of the optimizer gathered, TP shards
        assembled, pipeline stages merged."""
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
        adam_local = gather_optimizer_state(self.named_parameters(), self.optimizer,
                                       ps.get_data_parallel_group(with_context_parallel=True))
        device = self.ctx.device
        model = to_plain({n: s[MASTER] for n, s in adam_local.items()}, self.placements, tp_group, device)
        moments = {key: to_plain({n: s[key] for n, s in adam_local.items()}, self.placements, tp_group, device)
                   for key in ADAM_KEYS}
        steps = {self.plain_name(n): s["step"].cpu() for n, s in adam_local.items() if not self._duplicate(n)}
        adam = {name: {"step": steps[name], **{key: moments[key][name] for key in ADAM_KEYS}} for name in model}
        if self.mesh.pp > 1:  # every stage contributes its parameters
            parts = [None] * self.mesh.pp
            dist.all_gather_object(parts, (model, adam), group=ps.get_pipeline_model_parallel_group())
            model = {n: t for part in parts for n, t in part[0].items()}
            adam = {n: s for part in parts for n, s in part[1].items()}
        return {"model": model, "optimizer": {"adam": adam}}

    def load_state_dict(self, state: dict) -> None:
        """Load a full state (any layout's, or one process's) into this rank's shards."""
        full_model, full_adam = state["model"], state["optimizer"]["adam"]
        rank = self.mesh.tp_rank
        local_adam = {}
        for name, _ in self.named_parameters():
            plain = self.plain_name(name)
            local_adam[name] = {"step": full_adam[plain]["step"],
                                MASTER: from_plain(full_model, name, self.placements, rank).float(),
                                **{key: from_plain({plain: full_adam[plain][key]}, name, self.placements, rank)
                                   for key in ADAM_KEYS}}
        # Optimizer first: megatron initialises its state with a dummy step that moves parameters.
        scatter_optimizer_state(self.named_parameters(), self.optimizer, local_adam)
        with torch.no_grad():  # the model's copy (rounded to bf16 under mixed precision)
            for name, param in self.named_parameters():
                param.copy_(local_adam[name][MASTER])

    def plain_name(self, name: str) -> str:
        """The plain-model parameter that local parameter `name` is (a shard or copy of)."""
        p = self.placements.get(name)
        return p.plain if p is not None else ("embedding.weight" if name == "output_weight" else name)

    def _duplicate(self, name: str) -> bool:
        p = self.placements.get(name)
        return p is not None and p.duplicate
