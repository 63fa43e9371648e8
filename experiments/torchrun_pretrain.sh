#!/bin/bash
# Pre-training with torchrun, on one node or several: run this script on every node with the same NNODES, MASTER_ADDR
# and MASTER_PORT, and each node's own NODE_RANK (0 .. NNODES-1). For two nodes, on the first, from the checkout's root:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 experiments/torchrun_pretrain.sh \
#       --config configs/trainer/multinode.yaml --config configs/data/imagenet_folder.yaml \
#       --config configs/mae/vit_b16_1600ep_in1k.yaml
#
# The arguments go to `lightning-mim fit`. GPUS_PER_NODE processes start per node (default: every visible GPU);
# trainer.devices and trainer.num_nodes follow torchrun over any --config (a value typed on the command line must
# agree). Runs from any folder: relative paths (configs, data, the runs/ output) are taken from the current folder.
# The interpreter is $PYTHON, by default .venv/bin/python of the checkout in $LIGHTNING_MIM_ROOT, which defaults to
# the folder above this script.
set -euo pipefail
LIGHTNING_MIM_ROOT=${LIGHTNING_MIM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-$LIGHTNING_MIM_ROOT/.venv/bin/python}
if [[ ! -x $PYTHON ]]; then
    echo "torchrun_pretrain.sh: no Python at $PYTHON; set LIGHTNING_MIM_ROOT to the lightning_mim checkout" \
        "(or PYTHON to its interpreter)" >&2
    exit 2
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${GPUS_PER_NODE:-gpu}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m lightning_mim.cli fit "$@"
