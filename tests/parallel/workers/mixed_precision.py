"""Run under torchrun: the megatron engine's bf16 mixed precision against one process doing the same.

    torchrun --standalone --nproc-per-node 2 tests/parallel/workers/mixed_precision.py OUT CASE [CASE ...]

A case is `name:LAYOUT` (layouts as in layouts.py, with precision=bf16 added) or `name:A>B` (a resume).
The reference, on every rank, is megatron's recipe written out in plain PyTorch on the whole global
batch: a bf16 copy of the fp32 model computes each micro-batch's summed loss and its gradients, which
are added up in fp32, divided by the labelled tokens and handed to LocalEngine's AdamW on the fp32
weights (clipping included). After one step, with `exact` layouts (data and pipeline parallelism:
every micro-batch is the same bf16 computation, so only fp32 sums differ — except the tied embedding
under pipeline parallelism, whose two stages' gradients megatron adds in fp32 where one process adds
them in bf16, so it is held to the tensor-parallel bounds):
    loss              rtol 1e-6
    gradients         each rank's shard of the fp32 reduced gradient: rtol 1e-4, atol 1e-6
    master weights    engine.model_weights() (gathered from the optimizer's fp32 copies) against
                      the reference's fp32 weights: rtol 1e-4, atol 1e-5 — the same bound as the fp32
                      layouts, so bf16-rounded masters (initial or saved: ≈ 4e-5 off) fail it
and with tensor parallelism (the matmuls are split, so bf16 roundings differ) the loss within 2e-3,
the gradients and the weights' updates within 5% norm-wise. In every case the bf16 parameters are
exactly their masters rounded, and the masters are fp32 values (most not representable in bf16).
`A>B`: the state after A's step, gathered and loaded into layout B (other init), gathers back bit for
bit; so does a distributed checkpoint written by A (OUT/name) and loaded by B.
Prints `OK name` per case on rank 0; any mismatch raises (non-zero exit).
"""
from __future__ import annotations

import os
import sys
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist

from layouts import config, grad_shards, reference_part, train_step
from ratpt.config import to_yaml
from ratpt.model import build_model
from ratpt.parallel.process_group import init_distributed
from ratpt.engines.megatron_checkpoint import DistributedCheckpointer, load_sharded
from ratpt.parallel.mesh import destroy_mesh
from ratpt.engines.megatron_engine import MegatronEngine
from ratpt.checkpoint import load_checkpoint
from ratpt.engines import LocalEngine
from ratpt.engines.loss import cross_entropy_sum
from tests.cases import global_batches, rank_batches, split_case


def bf16_spec(spec: str) -> str:
    return ",".join(filter(None, [spec, "precision=bf16"]))


def engine_for(spec: str, ctx, seed: int) -> MegatronEngine:
    cfg = config(bf16_spec(spec))
    torch.manual_seed(seed)
    return MegatronEngine(cfg, ctx, build_model(cfg.model).to(ctx.device))


def reference_step(cfg, ctx, batches: list[dict]) -> tuple[LocalEngine, float, dict, dict]:
    """(LocalEngine on the fp32 weights after the step, loss, fp32 gradients, weights before the step)."""
    torch.manual_seed(0)
    master = build_model(cfg.model).to(ctx.device)
    before = {n: p.detach().clone() for n, p in master.named_parameters()}
    copy = deepcopy(master).to(torch.bfloat16)
    sums = {n: torch.zeros_like(p) for n, p in master.named_parameters()}
    loss, tokens = 0.0, 0
    for batch in batches:
        copy.zero_grad(set_to_none=True)
        micro = cross_entropy_sum(copy(batch["input_ids"].to(ctx.device)), batch["labels"].to(ctx.device))
        micro.backward()
        for n, p in copy.named_parameters():
            sums[n] += p.grad.float()
        loss += micro.item()
        tokens += int((batch["labels"] != -100).sum())
    engine = LocalEngine(cfg, ctx, master)
    for n, p in master.named_parameters():
        p.grad = sums[n] / tokens
    engine.clip_grad_norm(cfg.optimizer.grad_clip)
    grads = {n: p.grad.clone() for n, p in master.named_parameters()}
    engine.set_lr(cfg.optimizer.lr)
    engine.step()
    return engine, loss / tokens, grads, before


def assert_masters_are_fp32_and_parameters_their_rounding(name: str, engine: MegatronEngine, model: dict) -> None:
    for pname, param in engine.named_parameters():
        master = reference_part(engine, model, pname)
        assert master.dtype == torch.float32 and param.dtype == torch.bfloat16, (name, pname, master.dtype)
        assert torch.equal(param, master.to(param.device, torch.bfloat16)), (name, pname, "bf16 copy of the master")
    values = torch.cat([t.reshape(-1) for t in model.values()])
    unrepresentable = (values != values.bfloat16().float()).float().mean().item()
    assert unrepresentable > 0.9, (name, "masters look bf16-rounded", unrepresentable)


def check_step(name: str, spec: str, ctx) -> None:
    engine = engine_for(spec, ctx, 0)
    tied_apart = engine.mesh.pp > 1

    def exact(pname: str) -> bool:
        return engine.mesh.tp == 1 and not (tied_apart and engine.plain_name(pname) == "embedding.weight")

    cfg = engine.cfg
    batches = global_batches(cfg, 0)
    loss, _ = train_step(engine, cfg, rank_batches(batches, engine.dp_rank, engine.dp_size))
    reference, ref_loss, ref_grads, before = reference_step(cfg, ctx, batches)
    assert abs(loss - ref_loss) <= (1e-6 if engine.mesh.tp == 1 else 2e-3) * ref_loss, (name, "loss", loss, ref_loss)
    for pname, shard, where in grad_shards(engine):
        expected = reference_part(engine, ref_grads, pname).reshape(-1)[where]
        if exact(pname):
            torch.testing.assert_close(shard, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} grad {pname}: {m}")
        else:
            assert (shard - expected).norm() <= 0.05 * expected.norm() + 1e-8, (name, "grad", pname)
    engine.set_lr(cfg.optimizer.lr)
    engine.step()
    model = engine.model_weights()
    for pname, ref in reference.model.named_parameters():
        if exact(pname):
            torch.testing.assert_close(model[pname].to(ref.device), ref.detach(), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name} master weight {pname} after the step: {m}")
        else:
            update, ref_update = model[pname].to(ref.device) - before[pname], ref.detach() - before[pname]
            assert (update - ref_update).norm() <= 0.05 * ref_update.norm() + 1e-8, (name, "update", pname)
    assert_masters_are_fp32_and_parameters_their_rounding(name, engine, model)
    destroy_mesh()
    if ctx.rank == 0:
        print(f"OK {name} loss {loss:.6f} (reference {ref_loss:.6f})", flush=True)


def assert_same_state(name: str, got: dict, want: dict) -> None:
    for pname, tensor in want["model"].items():
        assert torch.equal(got["model"][pname], tensor), (name, "master weight", pname)
        for key, value in want["optimizer"]["adam"][pname].items():
            assert torch.equal(got["optimizer"]["adam"][pname][key], value), (name, key, pname)


def check_resume(name: str, spec_a: str, spec_b: str, out: Path, ctx) -> None:
    engine = engine_for(spec_a, ctx, 0)
    train_step(engine, engine.cfg, rank_batches(global_batches(engine.cfg, 0), engine.dp_rank, engine.dp_size))
    engine.set_lr(engine.cfg.optimizer.lr)
    engine.step()
    state = engine.state_dict()
    checkpointer = DistributedCheckpointer(asynchronous=False)
    checkpoint = checkpointer.save(engine, out / name, 1, {"step": 1}, to_yaml(engine.cfg), None, keep=1)
    destroy_mesh()
    for source in ("gathered", "distributed"):
        resumed = engine_for(spec_b, ctx, 1)  # another init: everything must come from the state
        if source == "gathered":
            resumed.load_state_dict(state)
        else:
            load_sharded(resumed, checkpoint, load_checkpoint(checkpoint)["adam_step"])
        assert_same_state(f"{name} ({source})", resumed.state_dict(), state)
        assert_masters_are_fp32_and_parameters_their_rounding(name, resumed, state["model"])
        destroy_mesh()
    if ctx.rank == 0:
        print(f"OK {name}", flush=True)


def main(out: Path, cases: list[str]) -> None:
    ctx = init_distributed(os.environ.get("RATPT_TEST_DEVICE", "cpu"))
    for case in cases:
        name, a, b = split_case(case)
        if b:
            check_resume(name, a, b, out, ctx)
        else:
            check_step(name, a, ctx)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
