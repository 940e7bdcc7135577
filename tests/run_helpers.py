"""Helpers of the end-to-end tests: a seconds-long run config, running the real CLI, or its trainer in this
process."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOSS_LINE = re.compile(r"step (\d+)/\d+ \| loss ([0-9.]+|nan)")


def small_run(data: Path, out_dir: Path, *extra: str) -> list[str]:
    """A seconds-long variant of configs/tiny.yaml on the byte tokenizer."""
    return [
        str(REPO / "configs" / "tiny.yaml"), f"out_dir={out_dir}", f"data.streams=[{{path: {data}}}]",
        "model.vocab_size=257", "model.d_model=64", "model.n_layers=2", "data.seq_len=64",
        "train.global_batch=8", "train.micro_batch=4", "eval.interval=0", "logging.interval=1",
        "logging.tensorboard=false", *extra,
    ]


def small_run_config(data: Path, out_dir: Path, *extra: str):
    """small_run's arguments loaded as `ratpt train` loads them, for a run in this process."""
    from ratpt.config import load_config

    config, *overrides = small_run(data, out_dir, *extra)
    return load_config(config, overrides)


def train_here(data: Path, out_dir: Path, *extra: str):
    """What `ratpt train` runs for small_run's arguments, in this process: for a run that only feeds a test
    (a reference, weights to start from), without the seconds of imports of a process of its own."""
    from ratpt.train.trainer import train

    return train(small_run_config(data, out_dir, *extra))


def ratpt(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ratpt", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, **kwargs)


def worker_env(**env_vars: str) -> dict[str, str]:
    """The environment of a worker script (tests/*/workers/): one thread per rank, and the repository on
    the path so that workers import `tests.cases`."""
    python_path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path, **env_vars}


def torchrun_cases(script: Path, nproc: int, *args: str, cases: tuple[str, ...], **env_vars: str) -> str:
    """One torchrun launch of a case script (tests/parallel/*.py: every rank checks each `name:spec` case
    and rank 0 prints `OK name`); fails with the ranks' output unless every case reported OK."""
    env = worker_env(**env_vars)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(script),
         *args, *cases], cwd=REPO, env=env, text=True, capture_output=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for case in cases:
        name = case.split(":")[0]
        assert re.search(rf"^OK {re.escape(name)}( |$)", done.stdout, re.MULTILINE), done.stdout
    return done.stdout


def losses_of(output: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in LOSS_LINE.findall(output)}


class CodeRunningPayload:
    """Unpickling this runs code (a print): what a safe loader must refuse."""

    def __reduce__(self):
        return (print, ("arbitrary code ran",))
