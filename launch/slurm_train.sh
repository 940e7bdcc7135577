#!/usr/bin/env bash
# The shared SLURM launcher: `ratpt train` on every node of the allocation, with preemption and
# requeue. A cluster script (launch/rat_1p3b.sh) holds the #SBATCH header and execs this file, so
# the batch script's process, which SLURM signals, is this one.
#
#   sbatch [options] launch/rat_1p3b.sh [CONFIG.yaml] [key=value ...]
#
# CONFIG defaults to $RATPT_CONFIG (the calling script sets it); $RATPT_OVERRIDES (space-separated
# key=value) come before the arguments' overrides. Relative paths are taken from the submit folder
# (the repository root), since SLURM runs a copy of the batch script from its spool folder.
#
# One srun task per node runs torchrun, which starts RATPT_NPROC_PER_NODE training processes
# (default: the node's allocated GPUs, else 1); torchrun's c10d rendezvous is hosted on the first
# node of the allocation, at a port free there.
#
# Preemption: SLURM signals this script with USR1 (`--signal=B:USR1@300`: 5 minutes before the
# time limit, or at preemption where the cluster sets PreemptParameters=send_user_signal), or a
# user does (`scancel --signal=USR1 --batch JOBID`). It sends USR1 to every training process;
# they agree to stop, finish the current step, write a checkpoint and exit 0
# (ratpt/train/signals.py). Then the job requeues itself and the requeued job resumes from that checkpoint (checkpoint.resume=auto). SLURM signals every process
# of a job step, so torchrun ignores USR1, whose default action would kill it. SIGTERM (scancel,
# the time limit itself, preemption without a signal) cannot take this path: srun answers it by
# killing the step, and the run resumes from its last periodic checkpoint.
#
# Failure: srun --kill-on-bad-exit stops every node as soon as one rank fails; rendezvous and
# collectives time out (RATPT_RDZV_TIMEOUT, RATPT_COLLECTIVE_TIMEOUT, in seconds) so a lost node
# fails the job instead of hanging it.
set -euo pipefail

REPO=${RATPT_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
PYTHON=${RATPT_PYTHON:-$REPO/.venv/bin/python}
CONFIG=${RATPT_CONFIG:-configs/rat_1p3b.yaml}
if [[ $# -gt 0 && $1 == *.yaml ]]; then
    CONFIG=$1
    shift
fi
if [[ ! -f $CONFIG ]]; then  # found here, before srun starts torchrun on every node to find it missing
    echo "launch/slurm_train.sh: config $CONFIG is not a file (relative paths are from $REPO)" >&2
    exit 2
fi
read -r -a OVERRIDES <<< "${RATPT_OVERRIDES:-}"
OVERRIDES+=("$@")

: "${SLURM_JOB_ID:?launch/slurm_train.sh runs inside a SLURM job: submit it with sbatch}"
NNODES=$SLURM_NTASKS  # torchrun agents, one per srun task (one per node in the shipped headers)
NPROC_PER_NODE=${RATPT_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$(( (SLURM_NTASKS + SLURM_NNODES - 1) / SLURM_NNODES ))}
CPUS_ON_NODE=${SLURM_CPUS_ON_NODE:-$(nproc)}

# The batch script runs on the first node, so a port free here is free on the rendezvous host.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${RATPT_MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS_ON_NODE / (NPROC_PER_NODE * TASKS_PER_NODE) > 0 ? CPUS_ON_NODE / (NPROC_PER_NODE * TASKS_PER_NODE) : 1 ))}
export RATPT_COLLECTIVE_TIMEOUT=${RATPT_COLLECTIVE_TIMEOUT:-1800}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a timed-out collective raises
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1  # log lines reach the SLURM log as they are written
export PYTHONFAULTHANDLER=1  # a rank killed by a fatal signal prints its Python stack

say() { echo "$(date +%T) launch: $*"; }
say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
     "$NNODES x $NPROC_PER_NODE ranks, rendezvous $MASTER_ADDR:$MASTER_PORT, $OMP_NUM_THREADS threads per rank"
say "ratpt train $CONFIG ${OVERRIDES[*]}"

stop_requested=0
request_stop() {
    say "USR1 received: every rank checkpoints after its current step, then the job requeues"
    stop_requested=1
    scancel --signal=USR1 "$SLURM_JOB_ID"  # every job step, not this script
}
trap request_stop USR1

srun --ntasks="$NNODES" --kill-on-bad-exit=1 \
    bash -c 'trap "" USR1; exec "$@"' torchrun "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --max-restarts=0 \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-conf="join_timeout=${RATPT_RDZV_TIMEOUT:-600}" \
    -m ratpt train "$CONFIG" "${OVERRIDES[@]}" &
srun_pid=$!
# `wait` returns early when a trapped signal arrives; keep waiting until srun itself has ended.
while true; do
    status=0
    wait "$srun_pid" || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
trap - USR1

if [[ $status -ne 0 ]]; then
    say "training failed (srun exit status $status); the failing rank's error is above" >&2
    exit "$status"
fi
if [[ $stop_requested -eq 1 ]] && ! "$PYTHON" "$REPO/launch/run_is_complete.py" "$CONFIG" "${OVERRIDES[@]}"; then
    say "checkpoint written; requeueing job $SLURM_JOB_ID to resume from it"
    scontrol requeue "$SLURM_JOB_ID"
fi
