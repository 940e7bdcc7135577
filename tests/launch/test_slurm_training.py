"""`sbatch launch/rat_1p3b.sh` on a real SLURM cluster: 2 tasks on one host stand for 2 nodes.

The header's 4 nodes x 4 GPUs are overridden on the sbatch command line (as a user would for a
smaller allocation) and the config is a seconds-long variant of configs/tiny.yaml on CPU, so what
runs is the shipped script and launcher: rendezvous, srun, torchrun, preemption and requeue.
"""
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, streams_override
from ratpt.checkpoint import latest_checkpoint, load_checkpoint
from run_helpers import losses_of

STEPS = 80
TWO_TASKS_ON_CPU = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=30")

pytestmark = pytest.mark.slow


def tiny_run(tokenized: Path, run_dir: Path, steps: int = STEPS) -> list[str]:
    return [
        "configs/tiny.yaml", f"out_dir={run_dir}", streams_override(tokenized), "model.vocab_size=257",
        "model.d_model=64", "model.n_layers=2", "data.seq_len=64", "train.global_batch=8", "train.micro_batch=4",
        "eval.interval=0", "logging.interval=1", "logging.tensorboard=false", f"train.steps={steps}",
        "checkpoint.interval=0",
    ]


def submit(slurm, tokenized: Path, run_dir: Path, steps: int = STEPS, env: dict | None = None) -> int:
    return slurm.sbatch(*TWO_TASKS_ON_CPU, f"--output={run_dir}.out", "launch/rat_1p3b.sh",
                        *tiny_run(tokenized, run_dir, steps), cwd=REPO, env=env)



def wait_for_step(log_file: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_file.is_file() and max(losses_of(log_file.read_text()), default=0) >= step:
            return
        time.sleep(0.1)
    raise TimeoutError(f"no step {step} in {log_file} after {timeout:.0f} s")


@pytest.fixture(scope="module")
def uninterrupted(slurm, tokenized, tmp_path_factory) -> tuple[dict, str, Path]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    record = slurm.wait(submit(slurm, tokenized, run_dir), timeout=150)
    return record, Path(f"{run_dir}.out").read_text(), run_dir


def test_tokenize_job_array_writes_one_dataset_part_per_task(tokenized):
    parts = sorted(p.name for p in tokenized.iterdir())
    assert parts == ["part_000", "part_001"]
    assert "data.streams=[{path: " in streams_override(tokenized)


def test_two_task_job_trains_with_falling_loss_and_writes_a_checkpoint(uninterrupted):
    record, log, run_dir = uninterrupted
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "2 process(es) on cpu" in log
    losses = losses_of(log)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = losses[1], sum(losses[s] for s in range(STEPS - 9, STEPS + 1)) / 10
    assert first > math.log(257) - 0.5, "a fresh model predicts close to uniform"
    assert last < first - 1.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{STEPS:08d}"


def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_result(slurm, tokenized, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, tokenized, run_dir)
    wait_for_step(Path(f"{run_dir}.out"), 2)
    slurm.signal_batch(job, "USR1")  # what --signal=B:USR1@300 does 5 minutes before the time limit
    record = slurm.wait(job, timeout=150)
    log = Path(f"{run_dir}.out").read_text()

    assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "1"), log
    stopped_at = int(re.search(r"stopped at step (\d+) on request", log).group(1))
    assert 2 <= stopped_at < STEPS
    assert "requeueing job" in log and "(restart 1)" in log
    assert re.search(rf"resumed from \S+step_{stopped_at:08d} at step {stopped_at}", log), log

    _, whole_log, whole_dir = uninterrupted
    assert losses_of(log)[STEPS] == losses_of(whole_log)[STEPS]
    resumed, whole = load_checkpoint(run_dir / "checkpoints"), load_checkpoint(whole_dir / "checkpoints")
    assert resumed["step"] == whole["step"] == STEPS
    for name, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


def training_rank_pid(run_dir: Path, rank: int) -> int:
    """The process of one training rank of the job writing to run_dir (a child of torchrun)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"out_dir={run_dir}".encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise LookupError(f"no rank {rank} process for {run_dir}")


def test_a_killed_rank_fails_the_job_with_a_clear_message_instead_of_hanging(slurm, tokenized, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, tokenized, run_dir, steps=100_000, env={"RATPT_COLLECTIVE_TIMEOUT": "60"})
    wait_for_step(Path(f"{run_dir}.out"), 2)
    os.kill(training_rank_pid(run_dir, 1), signal.SIGKILL)
    record = slurm.wait(job, timeout=60)
    log = Path(f"{run_dir}.out").read_text()
    assert record["JobState"] == "FAILED", log
    assert "training failed" in log
    assert re.search(r"rank\s*:\s*1", log) and "SIGKILL" in log, log
