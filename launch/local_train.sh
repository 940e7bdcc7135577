#!/usr/bin/env bash
# `ratpt train` on this machine without SLURM: one process per GPU under torchrun (or a single
# plain process when there is one GPU or none).
#
#   bash launch/local_train.sh configs/rat_125m.yaml [key=value ...]
#   RATPT_NPROC_PER_NODE=2 bash launch/local_train.sh configs/tiny.yaml   # e.g. 2 CPU ranks
#
# SIGTERM to this script's process makes every rank checkpoint after its current step and exit
# (torchrun passes it on, and kills ranks still running 30 s later); the same command resumes.
# Relative paths (CONFIG, overrides, the config's own) are taken from where it is run, as by `ratpt train`.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${RATPT_PYTHON:-$REPO/.venv/bin/python}
if ! command -v "$PYTHON" >/dev/null; then
    echo "no Python at $PYTHON: run launch/setup_env.sh, or set RATPT_PYTHON" >&2
    exit 2
fi
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
NPROC=${RATPT_NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}
if [[ $NPROC -eq 1 ]]; then
    exec "$PYTHON" -m ratpt train "$@"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" -m ratpt train "$@"
