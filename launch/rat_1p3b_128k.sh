#!/usr/bin/env bash
# RAT-1.3B continued at 131072 tokens per sequence: 4 nodes x 4 GPUs, configs/rat_1p3b_128k.yaml.
#
#   sbatch launch/rat_1p3b_128k.sh                                  # from the repository root
#   sbatch launch/rat_1p3b_128k.sh checkpoint.init_from=runs/rat_1p3b/checkpoints   # the 4K run to extend
#   sbatch launch/rat_1p3b_128k.sh configs/attention_1p3b_128k.yaml # the twins, same header
#   sbatch --nodes=8 launch/rat_1p3b_128k.sh parallel.context=2     # CP 2: half the activations per GPU
#
# The same launcher, preemption (USR1 five minutes before the limit, checkpoint, requeue) and
# failure handling as launch/rat_1p3b.sh; only the header's job name and config differ. A
# 131072-token step writes a checkpoint of the same size as a 4K one, so the 300 s of warning suffice.
# Logs go to launch/logs/<job name>-<job id>.out; checkpoints and TensorBoard events to the config's
# out_dir (runs/rat_1p3b_128k). Everything else is in launch/slurm_train.sh and docs/launching.md.
#SBATCH --job-name=rat_1p3b_128k
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
export RATPT_CONFIG=${RATPT_CONFIG:-configs/rat_1p3b_128k.yaml}
REPO=${RATPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $REPO/launch/slurm_train.sh ]] || { echo "no launch/slurm_train.sh in $REPO: submit from the repository root" \
    "(sbatch launch/rat_1p3b_128k.sh) or set RATPT_REPO to it" >&2; exit 2; }
exec bash "$REPO/launch/slurm_train.sh" "$@"
