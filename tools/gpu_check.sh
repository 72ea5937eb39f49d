#!/bin/sh
# GPU proof of the CUDA paths and speed/memory of each recipe at full size with random weights
# (no downloads). Run from the repo root; name the checks to run (default: the SD3.5 ones):
#
#   sh tools/gpu_check.sh tiny_sd35 medium_1gpu medium_2gpu
#
# tiny_<recipe>      the tiny recipe on 2 GPUs (torchrun, NCCL, bf16); tiny_sd35 also stops and resumes
# medium_{1,2}gpu    SD3.5 Medium recipe, 1024 px, one image per GPU
# large_2gpu         SD3.5 Large recipe on 2 GPUs
# flux_2gpu          FLUX.1-dev recipe on 2 GPUs (bf16 weights, 8-bit AdamW)
# sdxl_1gpu, dmd2_1gpu   SDXL SenseFlow and DMD2 recipes on 1 GPU
# bench_<recipe>_<n>gpu  `python -m senseflow.bench` (phases, FLOPs, MFU), e.g. bench_sd35_medium_1gpu,
#                    bench_flux_2gpu; bench_sd35_medium_2gpu_shardte adds model.shard_text_encoders=true;
#                    env BENCH_EXTRA adds config overrides, BENCH_TAG suffixes the result name, e.g.
#                    BENCH_TAG=lean BENCH_EXTRA="model.shard_discriminator=true" ... bench_sd35_medium_2gpu
# scaling_sd35_medium  bench_sd35_medium on 2 GPUs (model.fsdp=never) and then on 1, with the lean options and
#                    CUDA graphs (env SCALING_EXTRA replaces those two overrides; empty: none), and the images/s
#                    ratio (issue 8's 2-vs-1 goal; ~10 minutes on 2 x H200); scaling_sd35_medium_2gpu and
#                    scaling_sd35_medium_1gpu run one half each (the device's calls last at most 10 minutes)
# infer_<recipe>     `python -m senseflow.bench_inference` (4-step latency, ours vs stock diffusers)
# toy                `python -m senseflow.toy --preset gpu` (the distillation benchmark, ~12 min)
# env STEP_TIMEOUT limits each step in seconds (default 300: enough for the SD3.5 Medium bench with its FLOP
# count, which replays a TTUR period eagerly after the timed window in ~50 s on an H200; on an 80-GB H100 the
# lean 1-GPU replay runs out of memory and the JSON keeps the timed results without MFU), WARMUP and
# BENCH_ITERS the bench's iterations (default 3 and 10).
# Each prints `python -m senseflow.summarize` of its run (benchmarks: their table); logs and JSON go to
# $OUT (default /tmp/gpu_check).
set -u
OUT=${OUT:-/tmp/gpu_check}
ITERS=${ITERS:-22}
export SENSEFLOW_CACHE=${SENSEFLOW_CACHE:-/tmp/senseflow_cache}
mkdir -p "$OUT"
BF16="train.device=cuda precision.compute=bf16 precision.teacher=bf16 precision.text_encoders=bf16 log.progress_bar=false"
FULL="model.random_init=true paths.dataset=tiny:shapes data.format=json paths.dino=arch:dinov2_large \
paths.clip=arch:clip_vit_l14 checkpoint.enabled=false train.log_interval=1 train.image_interval=0 \
log.progress_bar=false train.resolution=1024"

step() {  # name, command...
    name=$1; shift
    start=$(date +%s)
    if timeout "${STEP_TIMEOUT:-300}" "$@" >"$OUT/$name.log" 2>&1; then status=ok; else status="FAILED ($?)"; fi
    echo "== $name: $status in $(( $(date +%s) - start ))s"
    [ "$status" = ok ] || tail -n 25 "$OUT/$name.log"
}

summary() { ${PYTHON:-python} -m senseflow.summarize "$OUT/$1" --skip "${2:-3}" 2>&1 | tr -d '\n '; echo; }

tiny() {  # name launcher config
    step "$1" sh "$2" 1 2 "$3" "$OUT/$1" $BF16 train.iter_num=10 train.log_interval=1
    summary "$1" 0
}

full() {  # name launcher config arch nproc [overrides...]
    name=$1 launcher=$2 config=$3 arch=$4 nproc=$5; shift 5
    devices=0; [ "$nproc" -gt 1 ] && devices=0,1
    step "$name" env CUDA_VISIBLE_DEVICES=$devices sh "$launcher" 1 "$nproc" "$config" "$OUT/$name" $FULL \
        "paths.pretrained_model=arch:$arch" "train.iter_num=$ITERS" "$@"
    summary "$name"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ $# -gt 0 ] || set -- tiny_sd35 medium_1gpu medium_2gpu
for check in "$@"; do
    case $check in
        tiny_sd35)
            L=exp_sd35/train_SD35_senseflow.sh C=configs/tiny/sd35_senseflow_tiny.yaml
            step tiny_sd35 sh $L 1 2 $C "$OUT/tiny_sd35" $BF16 train.iter_num=20
            step tiny_sd35_resume sh $L 1 2 $C "$OUT/tiny_sd35" $BF16 train.iter_num=30
            grep -h "resumed from" "$OUT/tiny_sd35_resume.log" | tail -n 1 ;;
        tiny_flux) tiny tiny_flux exp_flux/train_flux_senseflow.sh configs/tiny/flux_senseflow_tiny.yaml ;;
        tiny_sdxl) tiny tiny_sdxl exp_sdxl/train_sdxl_senseflow.sh configs/tiny/sdxl_senseflow_tiny.yaml ;;
        tiny_dmd2) tiny tiny_dmd2 exp_sdxl/train_sdxl_dmd2.sh configs/tiny/sdxl_dmd2_tiny.yaml ;;
        tiny_decoupled) tiny tiny_decoupled exp_sd35/train_SD35_senseflow_decoupled.sh configs/tiny/sd35_senseflow_decoupled_tiny.yaml ;;
        medium_1gpu) full medium_1gpu exp_sd35/train_SD35_senseflow.sh configs/SD35/sd35_senseflow.yaml sd35_medium 1 ;;
        medium_2gpu) full medium_2gpu exp_sd35/train_SD35_senseflow.sh configs/SD35/sd35_senseflow.yaml sd35_medium 2 ;;
        large_2gpu) full large_2gpu exp_sd35/train_SD35_large_senseflow.sh configs/SD35/sd35_large_senseflow.yaml sd35_large 2 ;;
        flux_2gpu) full flux_2gpu exp_flux/train_flux_senseflow.sh configs/FLUX/flux_senseflow.yaml flux_dev 2 ;;
        sdxl_1gpu) full sdxl_1gpu exp_sdxl/train_sdxl_senseflow.sh configs/sdxl/sdxl_senseflow.yaml sdxl_base 1 ;;
        dmd2_1gpu) full dmd2_1gpu exp_sdxl/train_sdxl_dmd2.sh configs/sdxl/sdxl_dmd2.yaml sdxl_base 1 ;;
        bench_*)
            spec=${check#bench_} extra=""
            case $spec in *_shardte) spec=${spec%_shardte} extra=model.shard_text_encoders=true ;; esac
            nproc=${spec##*_} recipe=${spec%_*}; nproc=${nproc%gpu}
            name=$check${BENCH_TAG:+_$BENCH_TAG}
            step "$name" torchrun --standalone --nproc_per_node "$nproc" -m senseflow.bench --recipe "$recipe" \
                --warmup "${WARMUP:-3}" --iters "${BENCH_ITERS:-10}" --out "$OUT/$name.json" $extra ${BENCH_EXTRA:-}
            grep -A3 "^| recipe" "$OUT/$name.log" | head -n 3 ;;
        scaling_sd35_medium|scaling_sd35_medium_2gpu|scaling_sd35_medium_1gpu)
            # issue 8's scaling goal: the lean options with CUDA graphs, replicated on 2 GPUs, then on GPU 0 alone
            lean="--no-flops --text-embeddings model.compile_blocks=true discriminator.compile_heads=true \
optimizer.offload_generator_state=true optimizer.offload_fake_state=generator_step model.offload_teacher=true \
optimizer.offload_overlap=true ${SCALING_EXTRA-model.compile_mode=reduce-overhead discriminator.compile_mode=reduce-overhead}"
            tag=${BENCH_TAG:-scaling}
            if [ "$check" != scaling_sd35_medium_1gpu ]; then
                BENCH_TAG=$tag BENCH_EXTRA="$lean model.fsdp=never" STEP_TIMEOUT=${STEP_TIMEOUT:-420} \
                    WARMUP=${WARMUP:-4} BENCH_ITERS=${BENCH_ITERS:-20} sh "$0" bench_sd35_medium_2gpu
            fi
            [ "$check" = scaling_sd35_medium ] && sleep 15  # the 2-GPU processes' exit must not overlap the 1-GPU run
            if [ "$check" != scaling_sd35_medium_2gpu ]; then
                BENCH_TAG=$tag BENCH_EXTRA="$lean" STEP_TIMEOUT=${STEP_TIMEOUT:-330} WARMUP=${WARMUP:-4} \
                    BENCH_ITERS=${BENCH_ITERS:-20} CUDA_VISIBLE_DEVICES=0 sh "$0" bench_sd35_medium_1gpu
            fi
            two="$OUT/bench_sd35_medium_2gpu_$tag.json" one="$OUT/bench_sd35_medium_1gpu_$tag.json"
            if [ -f "$two" ] && [ -f "$one" ]; then
                ${PYTHON:-python} -c 'import json, sys; a, b = (json.load(open(f))["images_per_sec"] for f in sys.argv[1:]); print(f"2 vs 1 GPU: {a:.3f} / {b:.3f} images/s = {a / b:.2f}x (goal >= 1.8x)")' "$two" "$one"
            fi ;;
        infer_*)
            step "$check" ${PYTHON:-python} -m senseflow.bench_inference --recipe "${check#infer_}" --out "$OUT/$check.json"
            tail -n 6 "$OUT/$check.log" ;;
        toy)
            step toy ${PYTHON:-python} -m senseflow.toy --preset gpu --out "$OUT/toy"
            tail -n 12 "$OUT/toy.log" ;;
        *) echo "unknown check $check" >&2 ;;
    esac
done
