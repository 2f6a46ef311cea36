#!/usr/bin/env bash
# Fashion-MNIST measurement of TrAct with `timm-tract compare` (README "TrAct on Fashion-MNIST", docs/fashion_mnist.md).
#
# Protocol (2 CPU cores, so a development subset and a narrow model):
#   data   the first 10,000 Fashion-MNIST training images for training, the last 2,000 training images for
#          validation (`timm-tract data fashion-mnist --subset 10000 2000`); the official test set is not touched
#          (it is kept for the zoo model, scripts/fashion_mnist_model.sh);
#   model  resnet18 narrowed to channels 16/32/64/128 (timm's 7x7/2 stem, 64 channels), 1 input channel, 28x28
#          inputs standardized with the Fashion-MNIST mean/std, vs resnet18_tract with the same widths (lambda 0.1);
#   recipe SGD momentum 0.9, batch 64, weight decay 5e-4, cosine per update, no warmup, no augmentation, no label
#          smoothing; the learning rate tuned for the BASELINE (step 1) and reused for TrAct, as in the paper;
#   runs   epoch budgets 1/2/4/8 (each its own full schedule), seeds 0-4: 40 runs, one torch thread each.
# Usage: scripts/fashion_mnist_compare.sh [OUTPUT_ROOT]   (default output/fmnist; step 1 ~2 min, step 2 ~25 min of
# CPU time on an AMD EPYC core; the compare runs --jobs runs at a time, default the number of cores)
set -euo pipefail
OUT=${1:-output/fmnist}
ROOT=$(timm-tract data fashion-mnist --subset 10000 2000)
COMMON=(--dataset torch/fashion_mnist --data-dir "$ROOT" --num-classes 10 --in-chans 1 --img-size 28 --crop-pct 1
        --mean 0.2860 --std 0.3530 -b 64 --weight-decay 5e-4 --sched cosine --sched-on-updates --warmup-epochs 0
        --smoothing 0 --no-aug --workers 0)
NARROW=(--model-kwargs "channels=(16,32,64,128)")

# 1. baseline learning rate: 4 epochs, seed 0 (and seed 1 around the best), final validation top-1
for run in "0.025 0" "0.05 0" "0.1 0" "0.2 0" "0.05 1" "0.1 1" "0.2 1"; do
  set -- $run
  OMP_NUM_THREADS=1 timm-tract train "${COMMON[@]}" --model resnet18 "${NARROW[@]}" --lr "$1" --epochs 4 --seed "$2" \
    --checkpoint-hist 1 --output "$OUT/lr-probe" --experiment "resnet18-lr$1-e4-s$2" > /dev/null
  echo "lr $1 seed $2: final top-1 $(tail -n 1 "$OUT/lr-probe/resnet18-lr$1-e4-s$2/summary.csv" | cut -d, -f4)"
done

# 2. the comparison with the best baseline lr (0.1 in our probe)
timm-tract compare "${COMMON[@]}" --model resnet18 "${NARROW[@]}" --lr 0.1 --budgets 1 2 4 8 --seeds 0 1 2 3 4 \
  --output "$OUT" --experiment dev10k-r18n
