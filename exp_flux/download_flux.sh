#!/bin/sh
# Download FLUX.1-dev (diffusers layout) and the discriminator backbones.
#   sh exp_flux/download_flux.sh DIR [--token TOKEN] [--revision R]
# Writes DIR/FLUX.1-dev, DIR/dinov2-large and DIR/clip-vit-l-14, then prints the paths: lines for the
# config. FLUX.1-dev is gated: accept the licence on https://huggingface.co/black-forest-labs/FLUX.1-dev
# and pass --token, or run `huggingface-cli login` / set HF_TOKEN. Rerun the same command to resume.
# Environment: PYTHON (default python).
set -eu

if [ $# -lt 1 ]; then
    sed -n '3,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
DIR=$1
shift
PYTHON=${PYTHON:-python}

"$PYTHON" -m senseflow.hub download flux_dev --out "$DIR/FLUX.1-dev" "$@"
"$PYTHON" -m senseflow.hub download dinov2_large --out "$DIR/dinov2-large"
"$PYTHON" -m senseflow.hub download clip_vit_l14 --out "$DIR/clip-vit-l-14"
