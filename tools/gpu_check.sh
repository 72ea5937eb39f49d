#!/bin/sh
# GPU proof of the CUDA paths (run from the repo root on a machine with 2 GPUs):
#  1. the tiny SD3.5 recipe on 2 GPUs (torchrun, NCCL, bf16), stopped at 20 iterations and resumed to 30;
#  2. SD3.5 Medium at full architecture size with random weights (no download) on 1 GPU;
#  3. the same on 2 GPUs (FSDP2 sharding of G, F and T).
# Prints a timing/memory summary of each run (python -m senseflow.summarize). Logs go to $OUT.
set -u
OUT=${OUT:-/tmp/gpu_check}
ITERS=${ITERS:-22}
export SENSEFLOW_CACHE=${SENSEFLOW_CACHE:-/tmp/senseflow_cache}
mkdir -p "$OUT"
BF16="train.device=cuda precision.compute=bf16 precision.teacher=bf16 precision.text_encoders=bf16 log.progress_bar=false"
TINY=configs/tiny/sd35_senseflow_tiny.yaml
FULL="paths.pretrained_model=arch:sd35_medium model.random_init=true paths.dataset=tiny:shapes \
paths.dino=arch:dinov2_large paths.clip=arch:clip_vit_l14 checkpoint.enabled=false train.log_interval=1 \
train.image_interval=0 log.progress_bar=false train.iter_num=$ITERS"
L=exp_sd35/train_SD35_senseflow.sh

step() {  # name, command...
    name=$1; shift
    start=$(date +%s)
    if timeout "${STEP_TIMEOUT:-300}" "$@" >"$OUT/$name.log" 2>&1; then status=ok; else status="FAILED ($?)"; fi
    echo "== $name: $status in $(( $(date +%s) - start ))s"
    [ "$status" = ok ] || tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step tiny2 sh $L 1 2 $TINY "$OUT/tiny2" $BF16 train.iter_num=20
step tiny2_resume sh $L 1 2 $TINY "$OUT/tiny2" $BF16 train.iter_num=30
grep -h "resumed from" "$OUT/tiny2_resume.log" | tail -n 1
python -m senseflow.summarize "$OUT/tiny2" --skip 0
step medium_1gpu env CUDA_VISIBLE_DEVICES=0 sh $L 1 1 configs/SD35/sd35_senseflow.yaml "$OUT/m1" $FULL
python -m senseflow.summarize "$OUT/m1"
step medium_2gpu sh $L 1 2 configs/SD35/sd35_senseflow.yaml "$OUT/m2" $FULL
python -m senseflow.summarize "$OUT/m2"
