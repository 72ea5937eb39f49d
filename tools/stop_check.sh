#!/bin/sh
# Graceful stop on GPUs: the tiny SD3.5 recipe under torchrun on N GPUs (NCCL, bf16) gets SIGTERM to its
# whole process group after a few logged iterations; it must stop with a checkpoint, and the same command
# must resume from it. Usage: sh tools/stop_check.sh [NPROC] [SAVE_DIR]
set -u
N=${1:-2}
DIR=${2:-/tmp/stop_check}
rm -rf "$DIR"
CMD="sh exp_sd35/train_SD35_senseflow.sh 1 $N configs/tiny/sd35_senseflow_tiny.yaml $DIR train.device=cuda \
precision.compute=bf16 precision.teacher=bf16 log.progress_bar=false train.log_interval=2 \
train.save_interval=1000 train.image_interval=0 data.num_workers=1"
setsid $CMD train.iter_num=2000 >"$DIR.log" 2>&1 &
pid=$!
while [ "$(cat "$DIR/metrics.jsonl" 2>/dev/null | wc -l)" -lt 3 ]; do
    kill -0 $pid 2>/dev/null || { echo "run ended early"; tail -20 "$DIR.log"; exit 1; }
    sleep 0.5
done
kill -TERM -$pid
wait $pid
echo "rc after SIGTERM to the process group: $?"
grep -E "received|stopped by" "$DIR.log" | head -3 | cut -c1-220
step=$(cat "$DIR/checkpoints/latest")
k=$(echo "$step" | sed 's/step_0*//')
echo "checkpoint $step; metrics end at $(tail -n 1 "$DIR/metrics.jsonl" | cut -c1-14)"
$CMD "train.iter_num=$((k + 4))" >"$DIR.resume.log" 2>&1
echo "resume rc $?: $(grep -o 'resumed from .*' "$DIR.resume.log" | head -1)"
tail -n 1 "$DIR/metrics.jsonl" | cut -c1-100
