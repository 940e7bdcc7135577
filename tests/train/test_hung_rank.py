"""A hung rank fails the run within RATPT_COLLECTIVE_TIMEOUT: every process group takes the timeout
(megatron-core's data-parallel group included, which waits in the gradient reduce-scatter)."""
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from run_helpers import LOSS_LINE, REPO, small_run

TIMEOUT_S = 10


def rank_pid(torchrun: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (its child whose environment says RANK=rank)."""
    children = Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split()
    for pid in map(int, children):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


def test_a_stopped_rank_makes_the_other_exit_within_the_timeout_naming_it(byte_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RATPT_COLLECTIVE_TIMEOUT": str(TIMEOUT_S)}
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ratpt",
         "train", *small_run(byte_data, tmp_path, "train.steps=100000", "checkpoint.interval=0")],
        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    workers: list[int] = []

    def kill_all() -> None:  # torchrun's workers run in sessions of their own: each is killed by its pid
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(torchrun.pid, signal.SIGKILL)

    # without the timeout rank 0 would wait 30 minutes: the test gives up (killing the launch) long before
    give_up = threading.Timer(120 + TIMEOUT_S, kill_all)
    give_up.start()
    try:
        for line in torchrun.stdout:
            if LOSS_LINE.search(line):
                break
        workers += [rank_pid(torchrun, 0), rank_pid(torchrun, 1)]
        os.kill(workers[1], signal.SIGSTOP)
        since = time.monotonic()
        message = next((line for line in torchrun.stdout if line.startswith("error: rank 0:")), None)
        waited = time.monotonic() - since
    finally:
        give_up.cancel()
        kill_all()
        torchrun.wait()
    assert message is not None and f"RATPT_COLLECTIVE_TIMEOUT={TIMEOUT_S} s" in message, message
    assert "another rank is hung, stopped or gone" in message
    assert waited < TIMEOUT_S + 20, f"rank 0 gave up after {waited:.0f} s"
