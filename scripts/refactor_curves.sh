#!/usr/bin/env bash
# The runs whose curves a pure refactor must not change: the default run (whole), a short fp16 run with value
# clipping (loss scaler and clipping), a short CycleGAN run and a short MAE run logging every step.
# Run it on a checkout of the old commit and of the new one (e.g. `git worktree add /tmp/old OLD`), then compare:
#   bash scripts/refactor_curves.sh /tmp/old /tmp/curves-old && bash scripts/refactor_curves.sh . /tmp/curves-new
#   python3 scripts/compare_curves.py /tmp/curves-old /tmp/curves-new
set -euo pipefail
SRC=$(cd "$1" && pwd); OUT=$2; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$SRC"
export PYTHONPATH=$SRC/src
P="python3 -m vitlab.cli"
$P train --no-progress --set out_dir="$OUT" --set name=default > "$OUT/default.log" 2>&1
$P train --no-progress --set out_dir="$OUT" --set name=fp16 --set train.precision=fp16 --set train.epochs=0.2 \
  --set optim.clip_grad_value=1.0 > "$OUT/fp16.log" 2>&1
$P translate-train configs/translate-builtin.yaml --no-progress --set out_dir="$OUT" --set name=gan --set train.epochs=0.3 \
  --set data.num_train=200 > "$OUT/gan.log" 2>&1
$P pretrain configs/pretrain/builtin-mae-vit22b-ti.yaml --no-progress --set out_dir="$OUT" --set name=mae \
  --set data.num_train=2000 --set train.epochs=1 --set train.log_every_steps=1 > "$OUT/mae.log" 2>&1
echo "curves of default, fp16, gan and mae in $OUT"
