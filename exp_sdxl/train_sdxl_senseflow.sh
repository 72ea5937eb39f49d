#!/bin/sh
# SenseFlow distillation of SDXL base 1.0.
#   sh exp_sdxl/train_sdxl_senseflow.sh NNODES GPUS_PER_NODE CONFIG SAVE_DIR [key=value ...]
# e.g. sh exp_sdxl/train_sdxl_senseflow.sh 1 8 configs/sdxl/sdxl_senseflow.yaml /path/to/save
# Multi-node (MASTER_ADDR, MASTER_PORT, NODE_RANK) and all options: see exp_common/launch.sh.
exec sh "$(dirname "$0")/../exp_common/launch.sh" "$@"
