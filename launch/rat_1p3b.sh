#!/usr/bin/env bash
# RAT-1.3B pretraining as in the paper: 4 nodes x 4 GPUs, configs/rat_1p3b.yaml.
#
#   sbatch launch/rat_1p3b.sh                                # from the repository root
#   sbatch launch/rat_1p3b.sh train.micro_batch=8            # key=value overrides
#   sbatch launch/rat_1p3b.sh configs/attention_1p3b.yaml    # another config, same header
#   RATPT_CONFIG=configs/rat_swa_1p3b.yaml sbatch launch/rat_1p3b.sh
#
# Adapt the header to your cluster (partition, account, time, GPUs per node); options given to
# sbatch on the command line win over these lines. Logs go to launch/logs/<job name>-<job id>.out
# and are appended to across requeues; checkpoints and TensorBoard events to the config's out_dir
# (runs/rat_1p3b). Everything else is in launch/slurm_train.sh.
#SBATCH --job-name=rat_1p3b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=launch/logs/%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my_account
export RATPT_CONFIG=${RATPT_CONFIG:-configs/rat_1p3b.yaml}
REPO=${RATPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $REPO/launch/slurm_train.sh ]] || { echo "no launch/slurm_train.sh in $REPO: submit from the repository root" \
    "(sbatch launch/rat_1p3b.sh) or set RATPT_REPO to it" >&2; exit 2; }
exec bash "$REPO/launch/slurm_train.sh" "$@"
