"""launch/local_train.sh: the one-machine launcher starts torchrun ranks that train to the end, and two
data-parallel ranks take the steps one process takes. One launch serves both tests (the ranks' start-up
is most of its time)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ratpt.checkpoint import load_checkpoint

from run_helpers import REPO, losses_of, small_run, train_here

STEPS = ("train.steps=3", "checkpoint.interval=0")


@pytest.fixture(scope="module")
def two_ranks(byte_data, tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("two")
    env = {**os.environ, "RATPT_NPROC_PER_NODE": "2", "RATPT_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "launch" / "local_train.sh"), *small_run(byte_data, run_dir, *STEPS)],
                          cwd=REPO, env=env, text=True, capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dir, done.stdout


def test_local_launcher_trains_with_two_ranks_and_checkpoints(two_ranks):
    run_dir, output = two_ranks
    assert "2 process(es) on cpu" in output
    assert sorted(losses_of(output)) == [1, 2, 3]
    assert load_checkpoint(run_dir / "checkpoints")["step"] == 3


def test_two_data_parallel_ranks_match_one_process(byte_data, two_ranks, tmp_path):
    run_dir, output = two_ranks
    one_losses, two_losses = train_here(byte_data, tmp_path / "one", *STEPS).losses, losses_of(output)
    assert sorted(two_losses) == [1, 2, 3] and len(one_losses) == 3
    for step, loss in enumerate(one_losses, start=1):
        assert two_losses[step] == pytest.approx(loss, abs=2e-4)
    a, b = load_checkpoint(tmp_path / "one" / "checkpoints"), load_checkpoint(run_dir / "checkpoints")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)
