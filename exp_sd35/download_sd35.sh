#!/bin/sh
# Download Stable Diffusion 3.5 (Medium or Large, diffusers layout) and the discriminator backbones.
#   sh exp_sd35/download_sd35.sh [medium|large] DIR [--token TOKEN] [--revision R]
# Writes DIR/stable-diffusion-3.5-{medium,large}, DIR/dinov2-large and DIR/clip-vit-l-14, then prints
# the paths: lines for the config. SD3.5 is gated: accept the licence on
# https://huggingface.co/stabilityai/stable-diffusion-3.5-medium (or -large) and pass --token, or run
# `huggingface-cli login` / set HF_TOKEN. Rerun the same command to resume an interrupted download.
# Environment: PYTHON (default python).
set -eu

if [ $# -lt 2 ]; then
    sed -n '3,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
VARIANT=$1
DIR=$2
shift 2
case "$VARIANT" in
    medium | large) ;;
    *) echo "download_sd35.sh: the first argument must be medium or large, got '$VARIANT'" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python}

"$PYTHON" -m senseflow.hub download "sd35_$VARIANT" --out "$DIR/stable-diffusion-3.5-$VARIANT" "$@"
"$PYTHON" -m senseflow.hub download dinov2_large --out "$DIR/dinov2-large"
"$PYTHON" -m senseflow.hub download clip_vit_l14 --out "$DIR/clip-vit-l-14"
