#!/usr/bin/env bash
# Everything the README reports for two GPUs, in one go: the NCCL tests of every parallel layout,
# mixed-precision layout, distributed checkpoint and DeepSpeed case against one process, then the
# engines at 4K (data parallel, with a kernel profile by category) and the 131072-token step of
# RAT-1.3B and attention-1.3B over context parallelism 2. Results are appended as JSON lines to
# OUT/engines.jsonl and OUT/long_context.jsonl (default OUT: benchmarks/results).
#
#     bash benchmarks/two_gpus.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -lt 2 ]; then
    echo "two_gpus.sh needs 2 GPUs (torch sees fewer)" >&2
    exit 2
fi
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
python -c "import ratpt_kernels" 2>/dev/null || {
    echo "the Triton kernels (kernels/) import as ratpt_kernels once ratpt is installed: pip install --no-deps -e ." >&2
    exit 2
}
run2() { python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/engines.py "$@"; }
set -x
tests=0
python -m pytest -q -m gpu tests/parallel tests/engines || tests=$?  # the benchmarks run regardless
run2 --engine megatron --global-batch 16 --micro-batch 4 --profile --out "$out/engines.jsonl"
run2 --engine deepspeed --zero-stage 1 --global-batch 16 --micro-batch 4 --profile --out "$out/engines.jsonl"
for model in rat_1p3b attention_1p3b; do
    run2 --engine megatron --config "$model" --global-batch 1 --micro-batch 1 --seq-len 131072 --steps 3 --warmup 2 \
        --set parallel.context=2 --set train.activation_checkpointing=true --out "$out/long_context.jsonl"
done
exit "$tests"
