"""Run under torchrun: the parallel engines with FP8-emulated projections against one process with the same.

    torchrun --standalone --nproc-per-node 2 tests/engines/workers/fp8_ranks.py CASE [CASE ...]

A case is `name:key=value,...` with `recipe=tensorwise|rowwise` (train.fp8; train.fp8_emulate is on)
and the other keys of the harness its name starts with: `megatron-` cases those of
tests/parallel/workers/layouts.py (parallel.*, model.*, train.micro_batch, ...), `deepspeed-` cases those of
tests/engines/workers/ds_cases.py (`stage=2`, `cp=2`, ...), on the same base configs and batches.
Every rank also trains the single-process LocalEngine with the same FP8 swap on the whole global batch,
and each case checks, over STEPS optimizer steps:
    the swap          every block projection the engine runs is torchao's Float8Linear (the engine's
                      wrapping kept the swapped modules: megatron's DDP, DeepSpeed's ZeRO hooks)
    loss, grad norm   every step: relative difference <= LOSS_REL, NORM_REL (2e-3, 1e-2)
Close, not equal as the fp32 harnesses check, because FP8 rounding depends on the scales: where a
rank casts the tensors the single process casts (DP, PP, ZeRO; tensorwise) the first step agrees to 1e-7
(seen), and later ones drift once round-off in the reduction moves an element across an FP8 rounding
boundary; context parallelism gives every rank its own dynamic scale over its part of the sequence, and rowwise's power-of-2 scales differ where an engine scales the gradients otherwise
(megatron divides by the token count after the reduction), so elements round to other FP8 values: the
gap is then FP8 noise, seen up to 4.4e-4 on the loss and 1.2e-3 on the grad norm (FP8 against fp32 on
the same steps: 6e-4 and 8e-3). The tolerances are about 5× and 8× what was seen.
Prints `OK name` per case on rank 0; a mismatch raises.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torchao.float8.float8_linear import Float8Linear

from ratpt.config import validate_config
from ratpt.engines import LocalEngine
from ratpt.engines.compile import prepare_model
from ratpt.model import build_model
from ratpt.parallel.mesh import destroy_mesh
from ratpt.parallel.process_group import init_distributed
from tests.cases import global_batches, parse_spec, rank_batches, split_case
from tests.parallel.workers import layouts

STEPS = 3
LOSS_REL, NORM_REL = 2e-3, 1e-2


def config(kind: str, spec: str):
    """The harness's config of `spec` with train.fp8 = its `recipe` (tensorwise by default), emulated."""
    items = parse_spec(spec)
    recipe = items.pop("recipe", "tensorwise")
    rest = ",".join(f"{key}={value}" for key, value in items.items())
    if kind == "deepspeed":
        from tests.engines.workers import ds_cases  # NOTE: imports deepspeed only for its cases

        cfg = ds_cases.config(rest)
    else:
        cfg = layouts.config(rest)
    cfg.train.fp8, cfg.train.fp8_emulate = recipe, True
    validate_config(cfg)
    return cfg


def build(kind: str, cfg, ctx):
    """The parallel engine of `kind` over the plain model of seed 0, its projections swapped by prepare_model."""
    torch.manual_seed(0)
    model = build_model(cfg.model).to(ctx.device)
    if kind == "deepspeed":
        from ratpt.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, ctx, model, prepare_model(model, cfg, ctx.device)), model
    return layouts.megatron_engine(cfg, ctx), None


def swapped_modules(model: torch.nn.Module) -> tuple[int, int]:
    """(block projections, of which Float8Linear) in `model`, named as in the plain model."""
    found = [module for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name.split(".")[-2:-1] in (["mixer"], ["ffn"])]
    return len(found), sum(isinstance(module, Float8Linear) for module in found)


def step(engine, cfg, batches) -> tuple[float, float]:
    loss_sum, tokens = engine.forward_backward(batches)
    grad_norm = engine.clip_grad_norm(cfg.optimizer.grad_clip)
    engine.set_lr(cfg.optimizer.lr)
    engine.step()
    return loss_sum / tokens, grad_norm


def check(name: str, spec: str, ctx) -> None:
    kind = name.split("-")[0]
    cfg = config(kind, spec)
    torch.manual_seed(0)
    plain = build_model(cfg.model).to(ctx.device)
    prepare_model(plain, cfg, ctx.device)
    reference = LocalEngine(cfg, ctx, plain)
    engine, model = build(kind, cfg, ctx)
    parts = [model] if model is not None else engine.chunks
    projections, fp8 = map(sum, zip(*(swapped_modules(part) for part in parts)))
    assert projections > 0 and fp8 == projections, (name, f"{fp8} of {projections} projections are Float8Linear")
    for i in range(STEPS):
        batches = global_batches(cfg, i)
        loss, norm = step(engine, cfg, rank_batches(batches, engine.dp_rank, engine.dp_size))
        ref_loss, ref_norm = step(reference, cfg, batches)
        assert abs(loss - ref_loss) <= LOSS_REL * ref_loss, (name, i, "loss", loss, ref_loss)
        assert abs(norm - ref_norm) <= NORM_REL * ref_norm, (name, i, "grad norm", norm, ref_norm)
    if kind == "megatron":
        destroy_mesh()
    if ctx.rank == 0:
        print(f"OK {name} loss {loss:.6f} (single {ref_loss:.6f}, rel {abs(loss - ref_loss) / ref_loss:.1e}) "
              f"grad norm {norm:.6f} (single {ref_norm:.6f}, rel {abs(norm - ref_norm) / ref_norm:.1e})", flush=True)


def main(cases: list[str]) -> None:
    ctx = init_distributed(os.environ.get("RATPT_TEST_DEVICE", "cpu"), group_of_one=True)
    for case in cases:
        name, spec, _ = split_case(case)
        check(name, spec, ctx)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
