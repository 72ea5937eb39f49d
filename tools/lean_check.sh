#!/bin/sh
# GPU check of the memory options' exactness across ranks: the tiny SD3.5 recipe on N GPUs (torchrun, NCCL,
# bf16) with the teacher parked, the generator kept gathered and the fake score's states parked as one
# overlapped copy, against the same run without them and a repeat of that (GPU kernels need not be
# bit-reproducible between runs); prints the largest relative difference of the losses and gradient norms
# of each pair over all logged iterations. Run from the repo root: sh tools/lean_check.sh 2
set -u
N=${1:-2}
OUT=${OUT:-/tmp/lean_check}
export SENSEFLOW_CACHE=${SENSEFLOW_CACHE:-/tmp/senseflow_cache}
mkdir -p "$OUT"
L=exp_sd35/train_SD35_senseflow.sh C=configs/tiny/sd35_senseflow_tiny.yaml
COMMON="train.device=cuda precision.compute=bf16 precision.teacher=bf16 precision.text_encoders=bf16 \
log.progress_bar=false train.iter_num=12 train.log_interval=1 distill.generator_period=3 checkpoint.enabled=false"
LEAN="model.offload_teacher=true model.keep_generator_gathered=true optimizer.offload_generator_state=true \
optimizer.offload_fake_state=generator_step optimizer.offload_overlap=true"
sh $L 1 "$N" $C "$OUT/plain" $COMMON >"$OUT/plain.log" 2>&1 || { tail -n 20 "$OUT/plain.log"; exit 1; }
sh $L 1 "$N" $C "$OUT/repeat" $COMMON >"$OUT/repeat.log" 2>&1 || { tail -n 20 "$OUT/repeat.log"; exit 1; }
sh $L 1 "$N" $C "$OUT/lean" $COMMON $LEAN >"$OUT/lean.log" 2>&1 || { tail -n 20 "$OUT/lean.log"; exit 1; }
${PYTHON:-python} - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {}
for name in ("plain", "repeat", "lean"):
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    runs[name] = {r["iter"]: {k: v for k, v in r.items() if k.startswith(("loss/", "grad_norm/"))} for r in rows}
    print(name, "iteration", max(runs[name]), runs[name][max(runs[name])])
for other in ("repeat", "lean"):
    a, b = runs["plain"], runs[other]
    assert a.keys() == b.keys(), (other, sorted(a), sorted(b))
    diff = max(abs(b[k][m] - v) / max(abs(v), 1e-12) for k in a for m, v in a[k].items())
    print(f"plain vs {other}: largest relative difference {diff:.3g}", "(identical)" if a == b else "")
PY
