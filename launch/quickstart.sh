#!/usr/bin/env bash
# The main job on the built-in corpus: set up, tokenize CPython's docs, pretrain a tiny RAT on
# CPU (or GPU if present), export it and generate a sample. Starts from scratch each time:
# it removes data/pydoc and runs/tiny, which belong to this demo alone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
set -x
rm -rf data/pydoc data/pydoc_bpe.json runs/tiny
python -m data_prep train-tokenizer pydoc --vocab-size 2048 --out data/pydoc_bpe.json
python -m data_prep tokenize pydoc --tokenizer data/pydoc_bpe.json --out data/pydoc --val-fraction 0.15
ratpt train configs/tiny.yaml
ratpt export runs/tiny --out runs/tiny/export
ratpt generate runs/tiny/export --prompt "The for statement" --max-new-tokens 80 --temperature 0.8 --top-k 40
