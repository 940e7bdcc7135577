#!/usr/bin/env bash
# Create .venv at the repository root and install ratpt with its pinned dependencies.
# The pins in requirements.txt are for CPU machines (torch==2.13.0 is a CPU wheel); on a GPU
# machine install a CUDA build of torch first and the rest will be kept as is.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
echo "ratpt installed in $(pwd)/.venv"
