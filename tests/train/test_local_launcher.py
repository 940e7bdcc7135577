"""launch/local_train.sh: the one-machine launcher starts torchrun ranks that train to the end."""
import os
import subprocess
import sys

from ratpt.checkpoint import load_checkpoint

from run_helpers import REPO, losses_of, small_run


def test_local_launcher_trains_with_two_ranks_and_checkpoints(byte_data, tmp_path):
    env = {**os.environ, "RATPT_NPROC_PER_NODE": "2", "RATPT_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "launch" / "local_train.sh"),
                           *small_run(byte_data, tmp_path, "train.steps=4", "checkpoint.interval=0")],
                          cwd=REPO, env=env, text=True, capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es) on cpu" in done.stdout
    assert sorted(losses_of(done.stdout)) == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "checkpoints")["step"] == 4
