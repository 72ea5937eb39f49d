#!/bin/sh
# Shared launcher behind exp_*/train_*.sh: checks the config, then starts torchrun.
#
#   sh exp_sd35/train_SD35_senseflow.sh NNODES GPUS_PER_NODE CONFIG SAVE_DIR [key=value ...]
#
# NNODES         number of nodes
# GPUS_PER_NODE  processes per node (GPUs; on a CPU-only machine, processes using gloo)
# CONFIG         YAML config, e.g. configs/SD35/sd35_senseflow.yaml
# SAVE_DIR       run directory; rerunning the same command resumes from its newest checkpoint
# key=value      config overrides, e.g. train.iter_num=10 train.batch_size=2
#
# Single node: nothing else is needed (torchrun --standalone picks a free port).
# Multi-node: run the same command on every node with these environment variables set:
#   MASTER_ADDR  address of node 0, reachable from all nodes
#   MASTER_PORT  a free TCP port on node 0 (same value on every node; default 29500)
#   NODE_RANK    this node's index, 0 .. NNODES-1
# The save directory must be on a filesystem shared by all nodes (checkpoints are sharded).
# Environment: PYTHON (default python), OMP_NUM_THREADS (default: torchrun's choice).
set -eu

if [ $# -lt 4 ]; then
    sed -n '3,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
NNODES=$1
GPUS=$2
CONFIG=$3
SAVE_DIR=$4
shift 4
PYTHON=${PYTHON:-python}
export PYTHONFAULTHANDLER=1

# Fail fast with one clear line on a bad config, path or dataset, before any process is started.
"$PYTHON" -m senseflow.train --preflight "$CONFIG" "$SAVE_DIR" "$@" || exit $?

if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$GPUS" \
        -m senseflow.train "$CONFIG" "$SAVE_DIR" "$@"
fi
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address for a multi-node run}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1) for a multi-node run}"
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --nproc_per_node "$GPUS" \
    -m senseflow.train "$CONFIG" "$SAVE_DIR" "$@"
