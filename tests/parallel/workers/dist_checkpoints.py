"""Run under torchrun: distributed checkpoints written by one layout resume in another.

    torchrun --standalone --nproc-per-node N tests/parallel/workers/dist_checkpoints.py OUT CASE [CASE ...]

A case is `name:A>B` (layouts as in layouts.py; B = `local` is one process, LocalEngine, on every rank)
or `name:A!` (an interrupted save). Every rank also runs the single-process reference
(LocalEngine) on the whole global batch.
    A>B   one step in A; a background (async) distributed save into OUT/name/checkpoints; rank 0
          checks that the full tensors read back from the shards are exactly the engine's gathered
          state (model, AdamW moments and step) and writes that gathered state as a plain checkpoint
          into OUT/name/gathered (for the export test); then a fresh engine in layout B (other init)
          loads the shards and takes the second step: loss and every parameter after it equal the
          reference (the tolerances of layouts.py)
    A!    step 1 saved and finalized; step 2's background save is scheduled, its writers finish, but
          it is not finalized (as if the job died then): the newest complete checkpoint — what
          `checkpoint.resume: auto` takes — is still step 1, and it loads to the step-1 state;
          once finalized, step 2 is the newest
Prints `OK name` per case on rank 0; any mismatch raises (non-zero exit).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from layouts import config, reference_part, train_step
from ratpt.config import to_yaml
from ratpt.model import build_model
from ratpt.parallel.process_group import init_distributed
from ratpt.engines.megatron_checkpoint import DIST_DIR, DistributedCheckpointer, load_sharded, read_plain_state
from ratpt.parallel.mesh import destroy_mesh
from ratpt.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ratpt.engines import LocalEngine
from tests.cases import global_batches, rank_batches, split_case


def build(spec: str, ctx, seed: int, local: bool = False):
    """The engine of layout `spec` (with `local`: one process's LocalEngine, same model) and its config."""
    from ratpt.engines.megatron_engine import MegatronEngine

    cfg = config(spec)
    torch.manual_seed(seed)
    model = build_model(cfg.model).to(ctx.device)
    return (LocalEngine if local else MegatronEngine)(cfg, ctx, model), cfg


def step(engine, cfg, index: int) -> float:
    loss, _ = train_step(engine, cfg, rank_batches(global_batches(cfg, index), engine.dp_rank, engine.dp_size))
    engine.set_lr(cfg.optimizer.lr)
    engine.step()
    return loss


def restore(engine, checkpoint: Path) -> None:
    if isinstance(engine, LocalEngine):
        engine.load_state_dict(read_plain_state(checkpoint))
    else:
        load_sharded(engine, checkpoint, load_checkpoint(checkpoint)["adam_step"])


def parameters(engine):
    return engine.model.named_parameters() if isinstance(engine, LocalEngine) else engine.named_parameters()


def assert_equal_states(plain: dict, gathered: dict, name: str) -> None:
    assert plain["model"].keys() == gathered["model"].keys(), (name, plain["model"].keys() ^ gathered["model"].keys())
    for pname, tensor in gathered["model"].items():
        assert torch.equal(plain["model"][pname], tensor), (name, "model", pname)
        for key, value in gathered["optimizer"]["adam"][pname].items():
            assert torch.equal(plain["optimizer"]["adam"][pname][key], value.reshape_as(
                plain["optimizer"]["adam"][pname][key])), (name, key, pname)


def resume_case(name: str, spec_a: str, spec_b: str, ctx, out: Path) -> None:
    reference, cfg = build(spec_a, ctx, 0, local=True)
    engine, _ = build(spec_a, ctx, 0)
    step(engine, cfg, 0)
    step(reference, cfg, 0)
    checkpointer = DistributedCheckpointer(asynchronous=True)
    checkpoint = checkpointer.save(engine, out / name / "checkpoints", 1, {"step": 1}, to_yaml(cfg), None, keep=2)
    checkpointer.wait()
    gathered = engine.state_dict()
    if ctx.rank == 0:
        assert_equal_states(read_plain_state(checkpoint), gathered, name)
        save_checkpoint(out / name / "gathered", 1, gathered, to_yaml(cfg), None, keep=1)
    dist.barrier()
    destroy_mesh()

    local = spec_b == "local"
    engine, cfg_b = build(spec_a if local else spec_b, ctx, 1, local)  # another init: all from the checkpoint
    restore(engine, checkpoint)
    loss, ref_loss = step(engine, cfg_b, 1), step(reference, cfg, 1)
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss, (name, "loss after resuming", loss, ref_loss)
    expected = dict(reference.model.named_parameters())
    for pname, param in parameters(engine):
        torch.testing.assert_close(param, reference_part(engine, expected, pname), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name} parameter {pname} after the resumed step: {m}")
    destroy_mesh()
    if ctx.rank == 0:
        print(f"OK {name} loss {loss:.6f} (single {ref_loss:.6f})", flush=True)


def interrupted_case(name: str, spec: str, ctx, out: Path) -> None:
    engine, cfg = build(spec, ctx, 0)
    directory = out / name / "checkpoints"
    checkpointer = DistributedCheckpointer(asynchronous=True)
    step(engine, cfg, 0)
    checkpointer.save(engine, directory, 1, {"step": 1}, to_yaml(cfg), None, keep=2)
    checkpointer.wait()
    saved = {n: p.detach().clone() for n, p in engine.named_parameters()}
    step(engine, cfg, 1)
    checkpointer.save(engine, directory, 2, {"step": 2}, to_yaml(cfg), None, keep=2)
    for call in checkpointer.queue.async_calls:  # the writers finish; nothing finalizes the save
        process = call.async_caller.process
        if process is not None:
            process.join()
    dist.barrier()
    newest = latest_checkpoint(directory)
    assert newest is not None and newest.name == "step_00000001", (name, newest)
    assert (directory / "step_00000002.tmp" / DIST_DIR).is_dir()
    other, _ = build(spec, ctx, 1)
    restore(other, newest)
    for pname, param in other.named_parameters():
        torch.testing.assert_close(param, saved[pname], rtol=0, atol=0, msg=lambda m: f"{name} {pname}: {m}")
    checkpointer.wait()
    assert latest_checkpoint(directory).name == "step_00000002"
    destroy_mesh()
    if ctx.rank == 0:
        print(f"OK {name}", flush=True)


def main(out: Path, cases: list[str]) -> None:
    ctx = init_distributed(os.environ.get("RATPT_TEST_DEVICE", "cpu"), group_of_one=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for case in cases:
        name, a, b = split_case(case)
        if b is None and a.endswith("!"):  # `name:LAYOUT!`: a save interrupted before it is finalized
            interrupted_case(name, a[:-1], ctx, out)
        else:
            resume_case(name, a, b, ctx, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # NOTE: the guard matters: megatron's writer spawns a helper that imports __main__
    main(Path(sys.argv[1]), sys.argv[2:])
