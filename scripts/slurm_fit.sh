#!/usr/bin/env bash
# Multi-node training under SLURM: one task per GPU; Lightning reads SLURM's environment
# (SLURM_NTASKS, SLURM_PROCID, SLURM_NODELIST ...) and sets up DDP itself.
#
#   sbatch --nodes 4 scripts/slurm_fit.sh -c configs/clip_vit_b16.yaml \
#          --data.init_args.train.urls 's3://bucket/laion-{000000..041407}.tar'
#
# trainer.num_nodes and trainer.devices must match the allocation; they are passed below.
#SBATCH --job-name=mmpt
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
mkdir -p logs
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
srun mmpt fit "$@" \
  --trainer.num_nodes "${SLURM_JOB_NUM_NODES:-1}" \
  --trainer.devices "${GPUS_PER_NODE}"
