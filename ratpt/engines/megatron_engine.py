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
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ratpt.checkpoint import load_checkpoint, resolve_checkpoint, save_gathered
from ratpt.config import Config
from ratpt.engines.loss import IGNORE_INDEX, compiled_cross_entropy_sum, cross_entropy_sum, document_inputs, uses_bf16
from ratpt.engines.megatron_checkpoint import DistributedCheckpointer, is_distributed, load_sharded
from ratpt.parallel.context_blocks import sequence_slice
from ratpt.parallel.mesh import Mesh, init_mesh
from ratpt.parallel.optimizer_state import (ADAM_KEYS, MASTER, gather_optimizer_state, load_master_weights,
                                            scatter_optimizer_state)
from ratpt.parallel.parallelize import parallelize
from ratpt.parallel.pipeline import stage_layers
from ratpt.parallel.process_group import DistributedContext
from ratpt.parallel.tensor_parallel import from_plain, to_plain

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


def wait_for_parameters_per_block(ddp) -> None:
    """With overlap_param_gather megatron waits for each module's all-gathered parameters in a forward
    pre-hook on every submodule; inside a compiled block those hooks would break the graph at every
    linear and norm. Hook the block instead: before it runs, wait for all of its parameters (the same
    all-gathers, waited for a few modules earlier)."""
    wait = ddp._make_forward_pre_hook()  # NOTE: megatron's own hook, applied to each submodule of the block

    def wait_for_block(block: nn.Module, args) -> None:
        for module in block.modules():
            wait(module)

    for block in ddp.module.layers.values():
        for module in block.modules():
            ddp.remove_forward_pre_hook_handles.pop(module).remove()
        block.register_forward_pre_hook(wait_for_block)


class MegatronEngine:
    """Forward/backward, clip and step of this rank's model part, via megatron-core."""

    def __init__(self, cfg: Config, ctx: DistributedContext, model: nn.Module,
                 compile_backend: Optional[str] = None) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.cfg, self.ctx = cfg, ctx
        self.mesh = mesh = init_mesh(cfg.parallel, ctx)
        self.dp_rank, self.dp_size = mesh.dp_rank, mesh.dp
        self.config = transformer_config(cfg, mesh, ctx.device)
        self.cross_entropy_sum = compiled_cross_entropy_sum(compile_backend) if compile_backend else cross_entropy_sum
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
        overlap = on_gpu and cfg.parallel.overlap_communication  # NOTE: overlap needs CUDA streams
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap,
            overlap_param_gather=overlap and cfg.parallel.distributed_optimizer,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            bucket_size=(cfg.parallel.bucket_size or None) if overlap else 2**62,  # no overlap: one bucket, at the end
        )
        # One DDP per model chunk; as in Megatron-LM, only the first chunk's gradients are bucketed.
        self.ddps = [DistributedDataParallel(self.config, ddp_config, module=chunk, disable_bucketing=i > 0)
                     for i, chunk in enumerate(self.chunks)]
        for ddp in self.ddps:
            ddp.broadcast_params()
            if ddp.use_forward_hook and compile_backend is not None:
                wait_for_parameters_per_block(ddp)
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
        if overlap:
            self.config.grad_sync_func = self.ddps[0].start_grad_sync if one else [d.start_grad_sync for d in self.ddps]
        distributed = cfg.checkpoint.format == "distributed"
        self.checkpointer = DistributedCheckpointer(cfg.checkpoint.async_save) if distributed else None

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
        # every stage keeps the documents apart; positions of whole rows, which each CP rank's mixers cut
        documents = document_inputs(batch, self.ctx.device)
        output = model(input_ids, labels=labels, **documents) if fused else model(input_ids, **documents)

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
                loss = self.cross_entropy_sum(output, labels)
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
        self._sync_params()
        for ddp in self.ddps:
            ddp.eval()
        try:
            return self.forward_backward(self._whole_pipeline_groups(list(batches)), forward_only=True)
        finally:
            for ddp in self.ddps:
                ddp.train()

    def _whole_pipeline_groups(self, batches: list[dict]) -> list[dict]:
        """`batches` padded for the interleaved schedule, which runs micro-batches in groups of
        parallel.pipeline (megatron raises otherwise): validation holds as many as eval.max_samples and the split
        give, unlike a training step (validate_config). The padding's labels are all ignored: it adds no loss
        and no token."""
        missing = -len(batches) % self.mesh.pp
        if self.mesh.virtual_stages == 1 or not missing:
            return batches
        unlabelled = {**batches[-1], "labels": torch.full_like(batches[-1]["labels"], IGNORE_INDEX)}
        return batches + [unlabelled] * missing

    def _sync_params(self) -> None:
        """Finish the all-gather of updated parameters now, which overlap_param_gather otherwise leaves
        to the next training forward (megatron launches it there)."""
        for ddp in self.ddps:
            if ddp.use_forward_hook:
                ddp.start_param_sync(force_sync=True)

    # ----- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, directory: Path, step: int, train_state: dict[str, Any], config_yaml: str,
                        tokenizer_dir: Optional[Path], keep: int) -> Path:
        """checkpoint.format: every rank its own shards (distributed), or the state gathered to rank 0."""
        if self.checkpointer is not None:
            return self.checkpointer.save(self, directory, step, train_state, config_yaml, tokenizer_dir, keep)
        return save_gathered(directory, step, {**train_state, **self.state_dict()}, config_yaml, tokenizer_dir, keep)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """A gathered or distributed checkpoint of any layout, into this rank's shards."""
        state = load_checkpoint(path, map_location=self.ctx.device)
        if is_distributed(state):
            load_sharded(self, resolve_checkpoint(path), state["adam_step"])
        else:
            self.load_state_dict(state)
        return state

    def poll(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.poll()

    def wait(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.wait()

    # ----- layout-independent state ---------------------------------------------------------
    def named_parameters(self):
        """(name, parameter) of this rank's part: plain-model names, TP-local shapes."""
        for chunk in self.chunks:
            yield from chunk.named_parameters()

    def model_weights(self) -> dict[str, torch.Tensor]:
        return self.state_dict(optimizer=False)["model"]

    def state_dict(self, optimizer: bool = True) -> dict:
        """Full model (the master weights: fp32 under mixed precision) and, with `optimizer`, AdamW moments by
        plain parameter name (collective: every rank calls it): DP × CP shards of the optimizer gathered, TP
        shards assembled, pipeline stages merged."""
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
        adam_local = gather_optimizer_state(self.named_parameters(), self.optimizer,
                                       ps.get_data_parallel_group(with_context_parallel=True), moments=optimizer)
        device = self.ctx.device
        model = to_plain({n: s[MASTER] for n, s in adam_local.items()}, self.placements, tp_group, device)
        adam = {}
        if optimizer:
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
