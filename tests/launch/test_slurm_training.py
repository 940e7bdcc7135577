"""`sbatch launch/rat_1p3b.sh` and `launch/rat_1p3b_128k.sh` on a real SLURM cluster: 2 tasks on one
host stand for 2 nodes.

The header's 4 nodes x 4 GPUs are overridden on the sbatch command line (as a user would for a
smaller allocation) and the config is a seconds-long variant of configs/tiny.yaml on CPU, so what
runs is the shipped script and launcher: rendezvous, srun, torchrun, preemption and requeue. The
preemption test runs the long-context recipe: a short run's weights continued at 16384 tokens with
context parallelism 2, against one process.
"""
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import REPO, streams_override
from ratpt.checkpoint import latest_checkpoint
from run_helpers import losses_of, ratpt

STEPS = 80
TWO_TASKS_ON_CPU = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=30")
# the long-context recipe at a CPU's scale: 16384 tokens per sequence (1024 chunks, as 128K has 8192; a step
# takes about a second on one core), one sequence per step, a constant learning rate
LONG_STEPS = 8
LONG = ("data.seq_len=16384", "train.global_batch=1", "train.micro_batch=1", "optimizer.lr=1e-3",
        "schedule.kind=constant", "schedule.warmup_fraction=0")

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


def test_a_long_context_job_over_cp2_extends_the_short_run_through_a_usr1_requeue_as_one_process_does(
        slurm, tokenized, uninterrupted, tmp_path):
    """launch/rat_1p3b_128k.sh's recipe: the short run's weights (checkpoint.init_from) continued at 16384
    tokens with context parallelism 2, one rank per task; USR1 in the middle checkpoints and requeues."""
    extend = [*tiny_run(tokenized, tmp_path / "cp2", LONG_STEPS), *LONG, f"checkpoint.init_from={uninterrupted[2]}"]
    job = slurm.sbatch(*TWO_TASKS_ON_CPU, f"--output={tmp_path}/cp2.out", "launch/rat_1p3b_128k.sh", *extend,
                       "parallel.context=2", cwd=REPO)
    wait_for_step(tmp_path / "cp2.out", 2)
    slurm.signal_batch(job, "USR1")  # what --signal=B:USR1@300 does 5 minutes before the time limit
    record = slurm.wait(job, timeout=240)
    log = (tmp_path / "cp2.out").read_text()

    assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "1"), log
    stopped_at = int(re.search(r"stopped at step (\d+) on request", log).group(1))
    assert 2 <= stopped_at < LONG_STEPS
    assert "requeueing job" in log and "(restart 1)" in log
    assert re.search(rf"resumed from \S+step_{stopped_at:08d} at step {stopped_at}", log), log
    assert "starting from the weights of" in log and "CP 2 × DP 1" in log

    one = ratpt("train", *[arg.replace("/cp2", "/one") for arg in extend], timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    cp2_losses, one_losses = losses_of(log), losses_of(one.stdout)
    assert sorted(cp2_losses) == sorted(one_losses) == list(range(1, LONG_STEPS + 1))
    for step, loss in one_losses.items():
        assert cp2_losses[step] == pytest.approx(loss, abs=2e-4), step
    assert one_losses[1] < math.log(257) - 2, "it starts from the short run's weights, not from scratch"


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
