#!/bin/bash
# Pre-training with torchrun, on one node or several (run this on every node with the same MASTER_ADDR).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 experiments/torchrun_pretrain.sh \
#       --config configs/trainer/multinode.yaml --config configs/data/imagenet_folder.yaml \
#       --config configs/mae/vit_b16_1600ep_in1k.yaml --trainer.num_nodes 2
#
# Lightning detects the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and does not spawn processes itself.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/torchrun \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m lightning_mim.cli fit --trainer.devices "${GPUS_PER_NODE:-8}" "$@"
