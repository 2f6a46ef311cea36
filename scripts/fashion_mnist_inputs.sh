#!/usr/bin/env bash
# TrAct on inputs that are not standardized (docs/inputs.md): `timm-tract compare` on Fashion-MNIST with three input
# pipelines x three methods, at two epoch budgets and three seeds.
#
# Protocol (the development split and recipe of scripts/fashion_mnist_compare.sh; the official test set is untouched):
#   data       first 10,000 training images train, last 2,000 training images validate
#              (`timm-tract data fashion-mnist --subset 10000 2000`)
#   pipelines  std:    standardized with the data's mean/std      (--mean 0.2860 --std 0.3530)
#              unit:   [0, 1], what ToTensor() gives              (--mean 0 --std 1)
#              raw255: [0, 255], raw pixel values                 (--mean 0 --std 1/255)
#   methods    baseline (resnet18 narrowed to 16/32/64/128, 1 channel, 28x28), TrAct absolute lambda 0.1 (the paper's),
#              TrAct relative lambda 0.1 (--tract-lambda-mode relative): one compare per TrAct mode and pipeline, so
#              each compare holds its own baseline runs (identical for both modes: same seeds, same machine)
#   recipe     SGD momentum 0.9, lr 0.1 (picked for the baseline on the standardized pipeline), batch 64, weight decay
#              5e-4, cosine per update, no warmup, no augmentation, no label smoothing; budgets 2 and 8 epochs, seeds
#              0-2, one torch thread per run
#   lr check   the baseline's lr is re-picked for the unit/raw255 pipelines exactly as it was picked for std (final
#              validation top-1 after 4 epochs, seed 0, lr in {0.025, 0.05, 0.1, 0.2}); where another lr wins, that
#              pipeline also gets a compare (absolute and relative) at the re-picked lr, so the comparison is fair.
# Usage: scripts/fashion_mnist_inputs.sh [OUTPUT_ROOT]   (default output/fmnist-inputs). About 1 h of wall-clock
# time on 2 idle cores (6 compares x 60 run-epochs of ~9 s CPU each, plus the lr check). Re-running the same command
# reuses finished compares (their report.md) and lr-check runs. Needs: apt-get install dataset-fashion-mnist.
set -euo pipefail
OUT=${1:-output/fmnist-inputs}
ROOT=$(timm-tract data fashion-mnist --subset 10000 2000)
COMMON=(--dataset torch/fashion_mnist --data-dir "$ROOT" --num-classes 10 --in-chans 1 --img-size 28 --crop-pct 1
        -b 64 --weight-decay 5e-4 --sched cosine --sched-on-updates --warmup-epochs 0 --smoothing 0 --no-aug
        --workers 0)
NARROW=(--model-kwargs "channels=(16,32,64,128)")
declare -A PIPE=([std]="--mean 0.2860 --std 0.3530" [unit]="--mean 0 --std 1" [raw255]="--mean 0 --std 0.00392156862745098")
LRS=(0.025 0.05 0.1 0.2)

# 1. lr check of the baseline on the unstandardized pipelines (4 epochs, seed 0, final validation top-1)
declare -A BEST_LR=([std]=0.1)
for pipe in unit raw255; do
  best=""; best_top1=-1
  for lr in "${LRS[@]}"; do
    name="resnet18-$pipe-lr$lr-e4-s0"
    if [ ! -f "$OUT/lr-check/$name/summary.csv" ]; then
      # shellcheck disable=SC2086
      OMP_NUM_THREADS=1 timm-tract train "${COMMON[@]}" ${PIPE[$pipe]} --model resnet18 "${NARROW[@]}" --lr "$lr" \
        --epochs 4 --seed 0 --checkpoint-hist 1 --output "$OUT/lr-check" --experiment "$name" > /dev/null
      rm -f "$OUT/lr-check/$name"/*.pth.tar
    fi
    top1=$(tail -n 1 "$OUT/lr-check/$name/summary.csv" | cut -d, -f4)
    echo "lr check: $pipe lr $lr: final top-1 $top1"
    if awk -v a="$top1" -v b="$best_top1" 'BEGIN {exit !(a > b)}'; then best=$lr; best_top1=$top1; fi
  done
  BEST_LR[$pipe]=$best
  echo "lr check: $pipe: best lr $best (top-1 $best_top1)"
done

# 2. the comparisons: every pipeline x TrAct mode at lr 0.1, plus the re-picked lr where it differs
run_compare() {  # pipeline mode lr
  local name="$1-$2-lr$3"
  if [ -f "$OUT/$name/report.md" ]; then echo "reusing $OUT/$name"; return; fi
  # shellcheck disable=SC2086
  timm-tract compare "${COMMON[@]}" ${PIPE[$1]} --model resnet18 "${NARROW[@]}" --lr "$3" --tract-lambda 0.1 \
    --tract-lambda-mode "$2" --budgets 2 8 --seeds 0 1 2 --output "$OUT" --experiment "$name" > /dev/null
  sed -n 3p "$OUT/$name/report.md"
}
for pipe in std unit raw255; do
  for mode in absolute relative; do
    run_compare "$pipe" "$mode" 0.1
    if [ "${BEST_LR[$pipe]}" != "0.1" ]; then run_compare "$pipe" "$mode" "${BEST_LR[$pipe]}"; fi
  done
done
echo "reports: $OUT/*/report.md"
