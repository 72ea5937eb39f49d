#!/bin/sh
# Decoupled-DMD variant of the SenseFlow SD3.5 Medium recipe (the fork's recipe).
#   sh exp_sd35/train_SD35_senseflow_decoupled.sh NNODES GPUS_PER_NODE CONFIG SAVE_DIR [key=value ...]
# e.g. sh exp_sd35/train_SD35_senseflow_decoupled.sh 1 8 configs/SD35/sd35_senseflow_decoupled.yaml /path/to/save
# Multi-node (MASTER_ADDR, MASTER_PORT, NODE_RANK) and all options: see exp_common/launch.sh.
exec sh "$(dirname "$0")/../exp_common/launch.sh" "$@"
