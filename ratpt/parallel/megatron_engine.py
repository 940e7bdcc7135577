"""One training step of a parallel layout through megatron-core.

    forward/backward  megatron's schedule (no pipelining, or 1F1B / interleaved for PP) over the
                      step's micro-batches; the loss is summed per token and megatron's
                      `finalize_model_grads` reduces gradients over DP × CP and divides them by the
                      global number of labelled tokens (`calculate_per_token_loss`), so the step's
                      loss and gradients are those of one process on the whole global batch
    clip, step        megatron's (distributed) optimizer: global grad norm over all ranks,
                      clip, AdamW on this rank's shard, all-gather of the updated parameters

The plain model is built on every rank from the same seed, turned into this rank's part by
`ratpt.parallel.parallelize`, then wrapped in megatron's DistributedDataParallel (gradient
buffers, bucketed reduce-scatter overlapped with backward on GPU).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ratpt.config import Config
from ratpt.parallel.context_parallel import sequence_slice
from ratpt.parallel.data_parallel import DistributedContext
from ratpt.parallel.mesh import Mesh, init_mesh
from ratpt.parallel.optimizer_state import gather_adam_state, scatter_adam_state
from ratpt.parallel.parallelize import parallelize

IGNORE_INDEX = -100


def transformer_config(cfg: Config, mesh: Mesh, device: torch.device):
    """The megatron `TransformerConfig` its DDP, schedules and optimizer read (shapes, groups, flags)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.transformer import TransformerConfig

    m = cfg.model
    return TransformerConfig(
        num_layers=m.n_layers, hidden_size=m.d_model, num_attention_heads=m.d_model // m.head_dim,
        tensor_model_parallel_size=mesh.tp, pipeline_model_parallel_size=mesh.pp,
        virtual_pipeline_model_parallel_size=mesh.virtual_stages if mesh.virtual_stages > 1 else None,
        context_parallel_size=mesh.cp, sequence_parallel=mesh.tp > 1,
        pipeline_dtype=torch.float32, params_dtype=torch.float32,
        use_cpu_initialization=device.type != "cuda", perform_initialization=False,
        calculate_per_token_loss=True, finalize_model_grads_func=finalize_model_grads,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
    )


class MegatronEngine:
    """Forward/backward, clip and step of this rank's model part, via megatron-core."""

    def __init__(self, cfg: Config, ctx: DistributedContext, model: nn.Module) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.cfg, self.ctx = cfg, ctx
        self.mesh = mesh = init_mesh(cfg.parallel, ctx)
        self.dp_rank, self.dp_size = mesh.dp_rank, mesh.dp
        self.model = model = parallelize(model, cfg, mesh)
        self.config = transformer_config(cfg, mesh, ctx.device)
        on_gpu = ctx.device.type == "cuda"
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=on_gpu,  # NOTE: overlap needs CUDA streams; on CPU the reduction is at the end
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            bucket_size=None if on_gpu else 2**62,
        )
        self.ddp = DistributedDataParallel(self.config, ddp_config, module=model)
        self.ddp.broadcast_params()
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
                            adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.grad_clip,
                            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
                            params_dtype=torch.float32),
            [self.ddp], use_gloo_process_groups=on_gpu,
        )
        self.config.no_sync_func = self.ddp.no_sync
        self.config.grad_sync_func = self.ddp.start_grad_sync if on_gpu else None

    # ----- the step -------------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[dict], forward_only: bool = False) -> tuple[float, float]:
        """Run the schedule over the micro-batches; (sum of the token losses, labelled tokens), global."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not forward_only:
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
        micro_batches = list(micro_batches)
        seq = self.cfg.data.seq_len // self.mesh.cp
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(micro_batches), model=[self.ddp],
            num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=self.cfg.train.micro_batch,
            forward_only=forward_only,
        )
        totals = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        for out in outputs:  # only the last pipeline stage has outputs
            totals += out["lm loss"].to(totals)
        # Every TP rank of the last stage counts the same tokens: the ratio is unaffected.
        dist.all_reduce(totals)
        return totals[0].item(), totals[1].item()

    def _forward_step(self, data_iterator: Iterable[dict], model: nn.Module):
        batch = next(data_iterator)
        input_ids = sequence_slice(batch["input_ids"], self.mesh).to(self.ctx.device, non_blocking=True)
        labels = sequence_slice(batch["labels"], self.mesh).to(self.ctx.device, non_blocking=True)
        with _autocast(self.ctx.device, self.cfg.train.precision):
            logits = model(input_ids)

        def loss_func(output: torch.Tensor):
            loss = F.cross_entropy(output.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
            tokens = (labels != IGNORE_INDEX).sum()
            report = torch.stack((loss.detach().double(), tokens.double()))
            return loss, tokens.to(torch.int), {"lm loss": report}

        return logits, loss_func

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
        self.ddp.eval()
        try:
            return self.forward_backward(list(batches), forward_only=True)
        finally:
            self.ddp.train()

    def state_dict(self) -> dict:
        """Full model and AdamW moments by name (collective: every rank calls it)."""
        from megatron.core import parallel_state as ps

        group = ps.get_data_parallel_group(with_context_parallel=True)
        adam = gather_adam_state(self.model, self.optimizer, group)
        return {"model": self.model.state_dict(), "optimizer": {"adam": adam}}

    def load_state_dict(self, state: dict) -> None:
        # Optimizer first: megatron initialises its state with a dummy step that moves parameters.
        scatter_adam_state(self.model, self.optimizer, state["optimizer"]["adam"])
        with torch.no_grad():
            self.model.load_state_dict(state["model"])


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
