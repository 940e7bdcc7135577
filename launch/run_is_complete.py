"""Exit 0 if a run's newest checkpoint is at its final step, 1 otherwise.

`python launch/run_is_complete.py CONFIG [key=value ...]` — the SLURM launcher asks this after a
stop signal: a run that was signalled during its last step has nothing left to do and must not be
requeued.
"""
import sys
from pathlib import Path

from ratpt.config import load_config
from ratpt.checkpoint import latest_checkpoint


def main(argv: list[str]) -> int:
    cfg = load_config(argv[0], argv[1:])
    newest = latest_checkpoint(Path(cfg.out_dir) / "checkpoints")
    done = newest is not None and int(newest.name.removeprefix("step_")) >= cfg.train.steps
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
