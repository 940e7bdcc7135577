#!/usr/bin/env bash
# Every engine side by side on one GPU, in one go, each as `ratpt train` prepares it (train.compile=auto:
# compiled on a GPU): RAT-1.3B at 4K tokens with MICRO_BATCH sequences per micro-batch (8 fits an 80 GB
# H100, 12 an H200) and two micro-batches per step, through the one-process engine, megatron-core's
# engine in a group of one, and DeepSpeed ZeRO-1; then (with `long`) the 131072-token step of RAT-1.3B
# and attention-1.3B through megatron's engine with activation checkpointing off and on (a step that
# runs out of memory is recorded as "does not fit"). JSON lines are appended to OUT/engines.jsonl and
# OUT/long_context.jsonl (default OUT: benchmarks/results).
#
#     bash benchmarks/engines_one_gpu.sh [OUT] [MICRO_BATCH] [4k|long|all]
#     (LONG_STEPS, LONG_WARMUP: timed and warm-up steps of each 131072-token run; default 3 and 2)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
micro="${2:-8}"
part="${3:-all}"
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
python -c "import ratpt_kernels" 2>/dev/null || {
    echo "the Triton kernels (kernels/) import as ratpt_kernels once ratpt is installed: pip install --no-deps -e ." >&2
    exit 2
}
set -x
if [ "$part" != long ]; then
    for engine in local megatron deepspeed; do
        python benchmarks/engines.py --engine "$engine" --zero-stage 1 --global-batch $((2 * micro)) \
            --micro-batch "$micro" --steps 8 --warmup 3 --out "$out/engines.jsonl"
    done
fi
if [ "$part" != 4k ]; then
    for checkpointing in false true; do
        for model in rat_1p3b attention_1p3b; do
            python benchmarks/engines.py --engine megatron --config "$model" --global-batch 1 --micro-batch 1 \
                --seq-len 131072 --steps "${LONG_STEPS:-3}" --warmup "${LONG_WARMUP:-2}" \
                --set train.activation_checkpointing=$checkpointing --out "$out/long_context.jsonl"
        done
    done
fi
