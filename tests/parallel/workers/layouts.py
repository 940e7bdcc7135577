"""Run under torchrun: every listed parallel layout against one process on the same batch.

    torchrun --standalone --nproc-per-node N tests/parallel/workers/layouts.py CASE [CASE ...]

A case is `name:key=value,key=value` over parallel.*, model.* keys, train.micro_batch and train.global_batch, e.g.
`cp2-hybrid:context=2,mixers=rat+swa`, or `resume:A>B` (train one step in layout A, carry the
gathered state into layout B, train a second step there; B = `local` is one process,
`LocalEngine`, on every rank). For each case, every rank also runs
the single-process reference (ratpt.engines.local_engine.LocalEngine) on the whole global batch and
checks, after one optimizer step:
    loss              |parallel - single| <= 1e-5 · loss
    gradients         each rank's shard of every parameter's reduced gradient (its tensor-parallel
                      part, of which the part its distributed optimizer owns; all of it without):
                      rtol 1e-4, atol 1e-6
    grad norm         rtol 1e-5
    parameters        after clip + AdamW + all-gather, all of them: rtol 1e-4, atol 1e-5 (0.1% of
                      the lr; Adam eps 1e-4 keeps the first step from amplifying round-off in tiny gradients)
Prints `OK name` per case on rank 0 (with `compile=true`: and the graph breaks dynamo makes in
one block of the rank); any mismatch raises (non-zero exit).
RATPT_TEST_DEVICE=cuda runs it on GPUs through NCCL (one process per GPU, fp32 with TF32 off, so
the same tolerances hold).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from ratpt.config import compiles, load_config
from ratpt.model import build_model
from ratpt.parallel.process_group import init_distributed
from ratpt.parallel.mesh import destroy_mesh
from tests.cases import global_batches, parse_spec, rank_batches, split_case
from ratpt.engines import LocalEngine
from ratpt.engines.compile import prepare_model

BASE = ["model.vocab_size=96", "model.d_model=64", "model.head_dim=16", "model.ngroups=2", "model.n_layers=2",
        "model.chunk_size=8", "model.window=8", "model.kernels=torch", "data.seq_len=64",
        "train.global_batch=4", "train.micro_batch=1", "train.precision=fp32", "train.steps=10",
        "schedule.warmup_fraction=0", "schedule.kind=constant", "optimizer.lr=1e-2", "optimizer.grad_clip=0.5", "optimizer.eps=1e-4",
        "data.streams=[{path: unused}]"]
MODEL_KEYS = {"mixers", "chunk_size", "window", "n_layers", "ffn", "ngroups", "head_dim", "kernels"}
TRAIN_KEYS = {"global_batch", "micro_batch", "precision", "fused_loss", "compile", "compile_backend",
              "activation_checkpointing"}
DATA_KEYS = {"document_masking"}


def config(spec: str):
    """The config of a layout SPEC: its keys are model.*, train.*, data.* (MODEL_KEYS, TRAIN_KEYS, DATA_KEYS)
    or parallel.*; mixers are `+`-joined (rat+swa)."""
    overrides = list(BASE)
    for key, value in parse_spec(spec).items():
        if key == "mixers":
            value = "[" + ",".join(value.split("+")) + "]"
        section = ("model" if key in MODEL_KEYS else "train" if key in TRAIN_KEYS else "data" if key in DATA_KEYS
                   else "parallel")
        overrides.append(f"{section}.{key}={value}")
    return load_config(None, overrides)


def train_step(engine, cfg, batches):
    loss_sum, tokens = engine.forward_backward(batches)
    grad_norm = engine.clip_grad_norm(cfg.optimizer.grad_clip)
    return loss_sum / tokens, grad_norm


def grad_shards(engine):
    """(name, this rank's slice of the flat gradient, the slice) for every parameter of its part."""
    from ratpt.parallel.optimizer_state import owning_optimizer

    if isinstance(engine, LocalEngine):
        yield from ((name, p.grad.reshape(-1), slice(None)) for name, p in engine.model.named_parameters())
        return

    for name, param in engine.named_parameters():
        flat = param.main_grad.view(-1)
        opt, distributed = owning_optimizer(engine.optimizer, param)
        if distributed:
            if param not in opt.model_param_gbuf_map:
                continue
            rng = opt._get_model_param_range_map(param)["param"]
            yield name, flat[rng.start:rng.end], slice(rng.start, rng.end)
        else:
            yield name, flat, slice(None)


def reference_part(engine, tensors: dict, name: str) -> torch.Tensor:
    """The single-process tensor (by plain name) cut to this rank's shard of parameter `name`."""
    from ratpt.parallel.tensor_parallel import from_plain

    if isinstance(engine, LocalEngine):
        return tensors[name]
    return from_plain(tensors, name, engine.placements, engine.mesh.tp_rank)


def megatron_engine(cfg, ctx, seed: int = 0):
    """The megatron engine of `cfg` over the plain model of `seed`, compiled if cfg.train.compile says so."""
    from ratpt.engines.megatron_engine import MegatronEngine

    torch.manual_seed(seed)
    model = build_model(cfg.model).to(ctx.device)
    return MegatronEngine(cfg, ctx, model, prepare_model(model, cfg, ctx.device))


def graph_breaks_per_block(engine, cfg) -> int:
    """The graph breaks dynamo makes in one block of this rank (its first), traced on an input of the
    block's local shape [micro-batch, T / (CP · TP), D] (collective: every rank traces its block)."""
    mesh = engine.mesh
    block = next(iter(engine.chunks[0].layers.values()))
    x = torch.randn(cfg.train.micro_batch, cfg.data.seq_len // (mesh.cp * mesh.tp), cfg.model.d_model,
                    device=engine.ctx.device)
    torch._dynamo.reset()
    return len(torch._dynamo.explain(block.forward)(x).break_reasons)


def check(name: str, spec_a: str, spec_b: str | None, ctx) -> None:
    cfg = config(spec_a)
    torch.manual_seed(0)
    reference = LocalEngine(cfg, ctx, build_model(cfg.model).to(ctx.device))
    engine = megatron_engine(cfg, ctx)
    steps = [(engine, cfg)]
    if spec_b is not None:  # one step in layout A, then the state moves to layout B
        loss, _ = train_step(engine, cfg, rank_batches(global_batches(cfg, 0), engine.dp_rank, engine.dp_size))
        engine.set_lr(cfg.optimizer.lr)
        engine.step()
        state = engine.state_dict()
        ref_loss, _ = train_step(reference, cfg, global_batches(cfg, 0))
        reference.set_lr(cfg.optimizer.lr)
        reference.step()
        assert abs(loss - ref_loss) <= 1e-5 * ref_loss, (name, "step 1", loss, ref_loss)
        destroy_mesh()
        cfg_b = config("" if spec_b == "local" else spec_b)
        torch.manual_seed(1)  # different init: everything must come from the state
        if spec_b == "local":  # one process, plain PyTorch (what `ratpt train` runs without torchrun)
            engine = LocalEngine(cfg_b, ctx, build_model(cfg_b.model).to(ctx.device))
        else:
            engine = megatron_engine(cfg_b, ctx, seed=1)
        engine.load_state_dict(state)
        steps = [(engine, cfg_b)]
    engine, cfg_run = steps[0]
    step = 1 if spec_b is not None else 0
    loss, grad_norm = train_step(engine, cfg_run, rank_batches(global_batches(cfg, step), engine.dp_rank,
                                                              engine.dp_size))
    ref_loss, ref_norm = train_step(reference, cfg, global_batches(cfg, step))
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss, (name, "loss", loss, ref_loss)
    ref_params = dict(reference.model.named_parameters())
    ref_grads = {n: p.grad for n, p in ref_params.items()}
    # the reference's gradients are clipped already; compare with the parallel ones clipped the same way
    for pname, shard, where in grad_shards(engine):
        expected = reference_part(engine, ref_grads, pname).reshape(-1)[where]
        torch.testing.assert_close(shard, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} grad {pname}: {m}")
    assert abs(grad_norm - ref_norm) <= 1e-5 * ref_norm, (name, "grad norm", grad_norm, ref_norm)
    engine.set_lr(cfg.optimizer.lr)
    engine.step()
    reference.set_lr(cfg.optimizer.lr)
    reference.step()
    parameters = engine.model.named_parameters() if isinstance(engine, LocalEngine) else engine.named_parameters()
    for pname, param in parameters:
        torch.testing.assert_close(param, reference_part(engine, ref_params, pname), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name} parameter {pname} after the step: {m}")
    breaks = f" graph breaks per block {graph_breaks_per_block(engine, cfg_run)}" if compiles(cfg_run.train, ctx.device.type) else ""
    destroy_mesh()
    if ctx.rank == 0:
        print(f"OK {name} loss {loss:.6f} (single {ref_loss:.6f}) grad norm {grad_norm:.6f}{breaks}", flush=True)


def main(cases: list[str]) -> None:
    ctx = init_distributed(os.environ.get("RATPT_TEST_DEVICE", "cpu"), group_of_one=True)  # cuda: NCCL on GPUs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for case in cases:
        check(*split_case(case), ctx)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
