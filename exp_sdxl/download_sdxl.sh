#!/bin/sh
# Download Stable Diffusion XL base 1.0 (diffusers layout, fp32 VAE) and the discriminator backbones.
#   sh exp_sdxl/download_sdxl.sh DIR [--token TOKEN] [--revision R]
# Writes DIR/stable-diffusion-xl-base-1.0, DIR/dinov2-large and DIR/clip-vit-l-14, then prints the
# paths: lines for the config. Rerun the same command to resume an interrupted download.
# Environment: PYTHON (default python).
set -eu

if [ $# -lt 1 ]; then
    sed -n '3,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
DIR=$1
shift
PYTHON=${PYTHON:-python}

"$PYTHON" -m senseflow.hub download sdxl_base --out "$DIR/stable-diffusion-xl-base-1.0" "$@"
"$PYTHON" -m senseflow.hub download dinov2_large --out "$DIR/dinov2-large"
"$PYTHON" -m senseflow.hub download clip_vit_l14 --out "$DIR/clip-vit-l-14"
