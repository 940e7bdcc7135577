"""Distributed checkpoints (`checkpoint.format=distributed`): every rank writes its own shards, and any
layout — or one process, or `ratpt export` — reads them back to the same state."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ratpt
from ratpt.model import build_model
from ratpt.checkpoint import load_checkpoint
from run_helpers import REPO, losses_of, ratpt as run_ratpt, small_run, torchrun_cases

CASES = (
    # TP × PP shards (fused in_proj rows, stages) into the distributed optimizer's DP × CP ranges, and back
    "tp2xpp2-to-dp2xcp2:pipeline=2,tensor=2,mixers=rat+swa>context=2,mixers=rat+swa",
    "dp2xcp2-to-tp2xdp2:context=2,mixers=rat+attention>tensor=2,mixers=rat+attention",
    "dp4-replicated-optimizer-to-pp2xtp2-interleaved:distributed_optimizer=false,n_layers=4>pipeline=2,tensor=2,"
    "virtual_stages=2,n_layers=4",
    "tp2xpp2-to-one-process:pipeline=2,tensor=2>local",
    "interrupted-tp2xdp2:tensor=2!",
)


def run_cases(nproc: int, out: Path, *cases: str, **env_vars: str) -> None:
    """One torchrun launch of tests/parallel/workers/dist_checkpoints.py (which checks every case)."""
    torchrun_cases(REPO / "tests" / "parallel" / "workers" / "dist_checkpoints.py", nproc, str(out), cases=cases, **env_vars)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist_checkpoints")
    run_cases(4, out, *CASES)
    return out


def test_a_checkpoint_resumes_in_other_layouts_and_an_unfinalized_save_is_not_resumed(saved):
    """The checks run in the torchrun launch (the fixture); here: its checkpoints are megatron's format."""
    assert (saved / "tp2xpp2-to-dp2xcp2" / "checkpoints" / "step_00000001" / "dist" / "metadata.json").is_file()


def test_export_of_a_distributed_checkpoint_gives_the_gathered_checkpoints_logits(saved, tmp_path):
    case = saved / "tp2xpp2-to-dp2xcp2"
    done = run_ratpt("export", str(case / "checkpoints"), "--out", str(tmp_path / "export"), "--no-tokenizer")
    assert done.returncode == 0, done.stderr
    exported, model_cfg = ratpt.load_pretrained(tmp_path / "export")
    gathered = build_model(model_cfg)  # the same step's state, gathered by the engine and written by rank 0
    gathered.load_state_dict(load_checkpoint(case / "gathered")["model"])
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 64))
    torch.testing.assert_close(exported(tokens), gathered(tokens), rtol=0, atol=0)


# as tests/parallel/test_training_layouts.py: 4 heads (2 per TP rank), vocab a multiple of 2, constant lr
RUN = ["model.vocab_size=258", "model.head_dim=16", "schedule.kind=constant", "schedule.warmup_fraction=0",
       "checkpoint.format=distributed", "train.steps=4"]


@pytest.mark.slow
def test_ratpt_train_resumes_a_distributed_checkpoint_in_one_process_with_the_uninterrupted_losses(byte_data,
                                                                                                 tmp_path):
    # uninterrupted: TP2, a background save every 2 steps
    tp2 = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ratpt",
         "train", *small_run(byte_data, tmp_path / "tp2", *RUN, "parallel.tensor=2", "checkpoint.async_save=true",
                             "checkpoint.interval=2")],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, capture_output=True, timeout=600,
    )
    assert tp2.returncode == 0, tp2.stdout[-3000:] + tp2.stderr[-6000:]
    uninterrupted = losses_of(tp2.stdout)
    assert uninterrupted.keys() == {1, 2, 3, 4}
    step2 = tmp_path / "tp2" / "checkpoints" / "step_00000002"
    assert (step2 / "dist").is_dir() and (tmp_path / "tp2" / "checkpoints" / "step_00000004" / "dist").is_dir()

    # its step-2 checkpoint, continued by one process (other layouts: tests/parallel/workers/dist_checkpoints.py)
    one = run_ratpt("train", *small_run(byte_data, tmp_path / "one", *RUN, f"checkpoint.resume={step2}"))
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "resumed from" in one.stdout + one.stderr
    losses = losses_of(one.stdout)
    assert losses.keys() == {3, 4}
    for step, loss in losses.items():
        assert loss == pytest.approx(uninterrupted[step], abs=2e-4)


@pytest.mark.gpu
def test_two_gpus_nccl_save_in_the_background_and_reshard(tmp_path):  # pragma: no cover - needs 2 GPUs
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_cases(2, tmp_path, "tp2-to-cp2:tensor=2,mixers=rat+swa>context=2,mixers=rat+swa",
              "pp2-to-tp2:pipeline=2>tensor=2", "dp2-to-one-process:>local", "interrupted-tp2:tensor=2!",
              RATPT_TEST_DEVICE="cuda")


@pytest.mark.gpu
def test_one_gpu_nccl_save_in_the_background_and_resume(tmp_path):  # pragma: no cover - needs a GPU
    """What one GPU checks of the background save: megatron's async writer staging CUDA shards to the
    host (NCCL, a group of one), the state read back equal to the engine's, a save whose writers
    finished but which was never finalized not resumed."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    run_cases(1, tmp_path, "dp1-to-one-process:>local", "interrupted-dp1:!", RATPT_TEST_DEVICE="cuda")


def test_every_ranks_shard_files_are_checksummed_and_a_changed_byte_in_one_is_named(saved, tmp_path):
    import json
    import shutil

    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    shutil.copytree(saved / "tp2xpp2-to-dp2xcp2" / "checkpoints" / "step_00000001", checkpoint)
    listed = json.loads((checkpoint / "checksums.json").read_text())["files"]
    shards = sorted(p.relative_to(checkpoint).as_posix() for p in (checkpoint / "dist").glob("*.distcp"))
    assert len(shards) >= 4 and set(shards) <= set(listed)  # every DCP file of the 4 ranks, hashed by some rank
    shard = checkpoint / shards[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    done = run_ratpt("export", str(checkpoint), "--out", str(tmp_path / "export"), "--no-tokenizer")
    assert done.returncode == 2 and shards[-1] in done.stderr and "broken" in done.stderr, done.stderr
