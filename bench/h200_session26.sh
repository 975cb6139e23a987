#!/usr/bin/env bash
# Session 26's calls, from the repository root of a device call; .whl carried:
#   GIT_COMMIT=<sha> bash bench/h200_session26.sh recipes   # any GPU: the 32K recipes as shipped (recompute: none
#                                                        # since this session; 8 x 32K tokens per step, synthetic
#                                                        # data so that no corpus travels), block 512 / top-3 also
#                                                        # with the full recomputation they shipped with before,
#                                                        # then block 2048 / top-4 as shipped (~3 min)
# The H200's table is session 25's `h200` call: GIT_COMMIT=<sha> bash bench/h200_session25.sh h200
case "${1:-}" in
recipes) ;;
*) echo "usage: bash bench/h200_session26.sh recipes" >&2; exit 2 ;;
esac
: "${GIT_COMMIT:?pass GIT_COMMIT=<sha>}"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in *H200*) TAG=h200 ;; *) TAG=h100 ;; esac
echo "device: $GPU"
source bench/gpu_env.sh
S=${GIT_COMMIT:0:7}
timeout 240 python3 scripts/bench_train.py --config configs/llama1b_moba_32k_b512.yaml data.kind=synthetic \
  logging.progress_bar=off --warmup 1 --steps 2 --arm shipped: --arm full_recompute:train.recompute=full \
  --out "$OUT/train-$TAG-$S-32k-b512-recipe.json" 2>&1 | grep -v -i warn | grep "tokens/s\|/ full\|Error\|error"
timeout 150 python3 scripts/bench_train.py --config configs/llama1b_moba_32k.yaml data.kind=synthetic \
  logging.progress_bar=off --warmup 1 --steps 2 --arm shipped: \
  --out "$OUT/train-$TAG-$S-32k-b2048-recipe.json" 2>&1 | grep -v -i warn | grep "tokens/s\|/ full\|Error\|error"
