#!/usr/bin/env bash
# Tokenize many input files as a SLURM job array. Task i of N tokenizes the inputs on lines
# i, i+N, i+2N, ... of LIST (one path per line) into OUT/part_<i>, a complete data_prep dataset,
# with one worker per CPU of the task. Options after OUT go to `python -m data_prep tokenize`.
#
#   ls /data/fineweb-edu/*.parquet > inputs.txt
#   sbatch --array=0-15 launch/tokenize.sh inputs.txt data/fineweb_edu --tokenizer llama2/tokenizer.model
#   python launch/streams_of.py data/fineweb_edu     # the data.streams override for training
#
# A requeued or resubmitted task continues its part (data_prep --resume) rather than starting over.
#SBATCH --job-name=tokenize
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=launch/logs/%x-%A_%a.out
set -euo pipefail

REPO=${RATPT_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
PYTHON=${RATPT_PYTHON:-$REPO/.venv/bin/python}
if [[ $# -lt 2 ]]; then
    echo "usage: sbatch --array=0-<N-1> launch/tokenize.sh LIST OUT [data_prep tokenize options]" >&2
    exit 2
fi
LIST=$1
OUT=$2
shift 2
if [[ ! -f $LIST || ! -r $LIST ]]; then
    echo "LIST $LIST is not a readable file (relative paths are from $REPO)" >&2
    exit 2
fi
: "${SLURM_ARRAY_TASK_ID:?submit as a job array: sbatch --array=0-<N-1> launch/tokenize.sh LIST OUT}"
TASK=$SLURM_ARRAY_TASK_ID
COUNT=$SLURM_ARRAY_TASK_COUNT
if [[ $SLURM_ARRAY_TASK_MIN -ne 0 || $SLURM_ARRAY_TASK_MAX -ne $((COUNT - 1)) ]]; then
    echo "the array must be 0-<N-1> with every index (got min $SLURM_ARRAY_TASK_MIN, max $SLURM_ARRAY_TASK_MAX, $COUNT tasks)" >&2
    exit 2
fi

mapfile -t INPUTS < <(grep -v '^[[:space:]]*$' "$LIST" | awk -v n="$COUNT" -v i="$TASK" '(NR - 1) % n == i')
if [[ ${#INPUTS[@]} -eq 0 ]]; then
    echo "task $TASK: no inputs (LIST has fewer lines than the array has tasks)"
    exit 0
fi
PART=$(printf '%s/part_%03d' "$OUT" "$TASK")
RESUME=()
[[ -d $PART ]] && RESUME=(--resume)
echo "task $TASK of $COUNT: ${#INPUTS[@]} input(s) -> $PART"
exec "$PYTHON" -m data_prep tokenize "${INPUTS[@]}" --out "$PART" --workers "${SLURM_CPUS_PER_TASK:-1}" "${RESUME[@]}" "$@"
