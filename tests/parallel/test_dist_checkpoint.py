"""Distributed checkpoints (`checkpoint.format=distributed`): every rank writes its own shards, and any
layout — or one process, or `ratpt export` — reads them back to the same state."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ratpt
from run_helpers import REPO, losses_of, ratpt as run_ratpt, small_run

CASES = (
    # TP × PP shards (fused in_proj rows, stages) into the distributed optimizer's DP × CP ranges, and back
    "tp2xpp2-to-dp2xcp2:pipeline=2,tensor=2,mixers=rat+swa>context=2,mixers=rat+swa",
    "dp2xcp2-to-tp2xdp2:context=2,mixers=rat+attention>tensor=2,mixers=rat+attention",
    "dp4-replicated-optimizer-to-pp2xtp2:distributed_optimizer=false>pipeline=2,tensor=2",
    "tp2xpp2-to-one-process:pipeline=2,tensor=2>local",
    "interrupted-tp2xdp2:tensor=2!",
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One torchrun launch of every case of tests/parallel/dist_checkpoints.py (which checks them)."""
    out = tmp_path_factory.mktemp("dist_checkpoints")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(REPO / "tests" / "parallel" / "dist_checkpoints.py"), str(out), *CASES],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for case in CASES:
        assert f"OK {case.split(':')[0]}" in done.stdout, done.stdout
    return out


def test_a_checkpoint_resumes_in_other_layouts_and_an_unfinalized_save_is_not_resumed(saved):
    assert (saved / "tp2xpp2-to-dp2xcp2" / "checkpoints" / "step_00000001" / "dist" / "metadata.json").is_file()


def test_export_of_a_distributed_checkpoint_gives_the_gathered_checkpoints_logits(saved, tmp_path):
    case = saved / "tp2xpp2-to-dp2xcp2"
    models = []
    for source in ("checkpoints", "gathered"):
        done = run_ratpt("export", str(case / source), "--out", str(tmp_path / source))
        assert done.returncode == 0, done.stderr
        models.append(ratpt.load_pretrained(tmp_path / source)[0])
    tokens = torch.randint(0, models[0].cfg.vocab_size, (2, 64))
    torch.testing.assert_close(models[0](tokens), models[1](tokens), rtol=0, atol=0)


# as tests/parallel/test_training_layouts.py: 4 heads (2 per TP rank), vocab a multiple of 2, constant lr
RUN = ["model.vocab_size=258", "model.head_dim=16", "checkpoint.keep=3", "schedule.kind=constant",
       "schedule.warmup_fraction=0", "checkpoint.format=distributed", "train.steps=4"]


def torchrun(data: Path, out_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ratpt",
         "train", *small_run(data, out_dir, *RUN, *overrides)],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=600,
    )


@pytest.mark.slow
def test_ratpt_train_resumes_a_distributed_checkpoint_in_other_layouts_with_the_uninterrupted_losses(byte_data,
                                                                                                   tmp_path):
    # uninterrupted: TP2, a background save every 2 steps
    tp2 = torchrun(byte_data, tmp_path / "tp2", "parallel.tensor=2", "checkpoint.async_save=true",
                   "checkpoint.interval=2")
    assert tp2.returncode == 0, tp2.stdout[-3000:] + tp2.stderr[-3000:]
    uninterrupted = losses_of(tp2.stdout)
    assert uninterrupted.keys() == {1, 2, 3, 4}
    step2 = tmp_path / "tp2" / "checkpoints" / "step_00000002"
    assert (step2 / "dist").is_dir() and (tmp_path / "tp2" / "checkpoints" / "step_00000004").is_dir()

    # its step-2 checkpoint, continued by CP2 (2 processes) and by one process
    cp2 = torchrun(byte_data, tmp_path / "cp2", "parallel.context=2", f"checkpoint.resume={step2}")
    one = run_ratpt("train", *small_run(byte_data, tmp_path / "one", *RUN, f"checkpoint.resume={step2}"))
    for resumed in (cp2, one):
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout + resumed.stderr
        losses = losses_of(resumed.stdout)
        assert losses.keys() == {3, 4}
        for step, loss in losses.items():
            assert loss == pytest.approx(uninterrupted[step], abs=2e-4)
