#!/bin/sh
# SenseFlow distillation of FLUX.1-dev.
#   sh exp_flux/train_flux_senseflow.sh NNODES GPUS_PER_NODE CONFIG SAVE_DIR [key=value ...]
# e.g. sh exp_flux/train_flux_senseflow.sh 1 8 configs/FLUX/flux_senseflow.yaml /path/to/save
# Multi-node (MASTER_ADDR, MASTER_PORT, NODE_RANK) and all options: see exp_common/launch.sh.
exec sh "$(dirname "$0")/../exp_common/launch.sh" "$@"
