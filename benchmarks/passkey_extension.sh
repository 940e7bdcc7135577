#!/usr/bin/env bash
# The context-extension path end to end, at length: a tiny byte-level RAT (configs/tiny.yaml's shape)
# trained at 1024 tokens on CPython's documentation, continued at 16384 tokens from those weights
# (checkpoint.init_from), exported, and asked for a passkey hidden in prompts of 4K, 32K and 128K
# tokens (`ratpt evaluate-long`). The point is that every step runs at these lengths; a model this
# small, trained for seconds on documentation, is not expected to find the key.
#
#     bash benchmarks/passkey_extension.sh [OUT] [key=value ...]   # overrides go to the extended run
#     (SHORT_STEPS, LONG_STEPS: steps of the two runs, default 200 and 40; TRIALS: keys per length and
#     depth, default 2; DTYPE: of the evaluation, default bfloat16. Smaller values for a CPU)
#
# OUT (default benchmarks/results/passkey_extension) receives passkey.json, passkey.png and the two
# runs' logs; data, checkpoints and the export go to a temporary folder. Blocks run uncompiled
# (train.compile=false): compiling a model this small costs more than it saves.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/passkey_extension}"
shift $(( $# > 0 ? 1 : 0 ))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
python=${PYTHON:-python}
run=(configs/tiny.yaml "data.streams=[{path: $work/pydoc}]" model.vocab_size=257 train.compile=false
     eval.interval=0 logging.tensorboard=false logging.interval=10)
set -x
"$python" -m data_prep tokenize pydoc --out "$work/pydoc" --tokenizer byte --val-fraction 0.05
"$python" -m ratpt train "${run[@]}" out_dir="$work/short" data.seq_len=1024 train.steps="${SHORT_STEPS:-200}" \
    train.global_batch=16 train.micro_batch=16 2>&1 | tee "$out/train_1024.log"
"$python" -m ratpt train "${run[@]}" out_dir="$work/long" data.seq_len=16384 train.steps="${LONG_STEPS:-40}" \
    train.global_batch=2 train.micro_batch=2 optimizer.lr=1e-3 checkpoint.init_from="$work/short" "$@" \
    2>&1 | tee "$out/train_16384.log"
"$python" -m ratpt export "$work/long" --out "$work/export"
"$python" -m ratpt evaluate-long "$work/export" --lengths 4096,32768,131072 --depths 0,0.5,1 \
    --trials "${TRIALS:-2}" --dtype "${DTYPE:-bfloat16}" --out "$out" 2>&1 | tee "$out/evaluate_long.log"
