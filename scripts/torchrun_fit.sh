#!/usr/bin/env bash
# Multi-node training with torchrun (no SLURM). Run this on every node with the same
# MASTER_ADDR/MASTER_PORT and its own NODE_RANK; Lightning picks up torchrun's environment.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/torchrun_fit.sh -c configs/clip_vit_b16.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/torchrun_fit.sh -c configs/clip_vit_b16.yaml
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m mmpt.cli fit "$@" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE"
