#!/usr/bin/env bash
# Session 26's calls, from the repository root of a device call; carry .whl and data/corpus (`make data`):
#   GIT_COMMIT=<sha> bash bench/h200_session26.sh recipes   # any GPU (~5 min):
#     1. scripts/bench_memory.py at the 32K recipe (no recomputation) and the 128K recipe (the MLP recomputed):
#        what one layer keeps for its backward, measured against moba_train/memory.py's formula;
#     2. the sparser 32K recipe as shipped (recompute: none since this session), on its indexed data (the
#        embedded corpus: packed documents, so RoPE takes the thd path, since this session our kernel), 2 x 32K
#        tokens per step; against Megatron's per-document RoPE (rope=compile, the thd path before this
#        session), the full recomputation the recipe shipped with, and synthetic data (one document per sample)
# The H200's table is session 25's `h200` call: GIT_COMMIT=<sha> bash bench/h200_session25.sh h200
case "${1:-}" in
recipes) ;;
*) echo "usage: bash bench/h200_session26.sh recipes" >&2; exit 2 ;;
esac
: "${GIT_COMMIT:?pass GIT_COMMIT=<sha>}"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in *H200*) TAG=h200 ;; *) TAG=h100 ;; esac
echo "device: $GPU"
[ -f data/corpus/python.idx ] || { echo "data/corpus is missing: run make data here and carry data/corpus" >&2; exit 1; }
source bench/gpu_env.sh
S=${GIT_COMMIT:0:7}
timeout 150 python3 scripts/bench_memory.py --config configs/llama1b_moba_32k_b512.yaml data.kind=synthetic \
  --out "$OUT/memory-$TAG-$S-32k.json" 2>&1 | grep -v -i warn | grep "B/token\|rror"
timeout 150 python3 scripts/bench_memory.py --config configs/llama1b_moba_128k.yaml data.kind=synthetic \
  --out "$OUT/memory-$TAG-$S-128k.json" 2>&1 | grep -v -i warn | grep "B/token\|rror"
timeout 300 python3 scripts/bench_train.py --config configs/llama1b_moba_32k_b512.yaml logging.progress_bar=off \
  train.global_batch_size=2 "run.output_dir=/tmp/runs/b512" --warmup 2 --steps 5 --profile --arm shipped: \
  --arm megatron_rope:model.fusions.rope=compile --arm synthetic:data.kind=synthetic \
  --arm full_recompute:train.recompute=full \
  --out "$OUT/train-$TAG-$S-32k-b512-recipe.json" 2>&1 | grep -v -i warn | grep "tokens/s\|breakdown\|rror"
