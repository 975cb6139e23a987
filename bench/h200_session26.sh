#!/usr/bin/env bash
# Session 26's calls, from the repository root of a device call; carry .whl and data/corpus (`make data`):
#   GIT_COMMIT=<sha> bash bench/h200_session26.sh recipes   # any GPU (~5 min):
#     1. scripts/bench_memory.py at the 32K recipe (no recomputation) and the 128K recipe (the MLP recomputed):
#        what one layer keeps for its backward, measured against moba_train/memory.py's formula;
#     2. the sparser 32K recipe as shipped (recompute: none since this session), on its indexed data (the
#        embedded corpus; attention across documents, Megatron's default, so one row per sample and the fused
#        QKV RoPE), 2 x 32K tokens per step; against rope=compile, the full recomputation the recipe shipped
#        with, and synthetic data
#     (run at 5377e38, where bench_memory measured an fp32 model: fixed since, and its full arm ran out of memory)
#   GIT_COMMIT=<sha> bash bench/h200_session26.sh recipes packed   # 1., then 2. with attention per document
#     (data.reset_attention_mask): RoPE on packed documents, ours against Megatron's, and full attention there
# The H200's table is session 25's `h200` call: GIT_COMMIT=<sha> bash bench/h200_session25.sh h200
case "${1:-}" in
recipes) ;;
*) echo "usage: bash bench/h200_session26.sh recipes" >&2; exit 2 ;;
esac
: "${GIT_COMMIT:?pass GIT_COMMIT=<sha>}"
[ -f data/corpus/python.idx ] || { echo "data/corpus is missing: run make data here and carry data/corpus" >&2; exit 1; }
source bench/gpu_env.sh  # also GPU, TAG and S
timeout 150 python3 scripts/bench_memory.py --config configs/llama1b_moba_32k_b512.yaml data.kind=synthetic \
  --out "$OUT/memory-$TAG-$S-32k.json" 2>&1 | grep -v -i warn | grep "B/token\|rror"
timeout 150 python3 scripts/bench_memory.py --config configs/llama1b_moba_128k.yaml data.kind=synthetic \
  --out "$OUT/memory-$TAG-$S-128k.json" 2>&1 | grep -v -i warn | grep "B/token\|rror"
if [ "${2:-}" != packed ]; then
timeout 300 python3 scripts/bench_train.py --config configs/llama1b_moba_32k_b512.yaml logging.progress_bar=off \
  train.global_batch_size=2 "run.output_dir=/tmp/runs/b512" --warmup 2 --steps 5 --profile --arm shipped: \
  --arm megatron_rope:model.fusions.rope=compile --arm synthetic:data.kind=synthetic \
  --arm full_recompute:train.recompute=full \
  --out "$OUT/train-$TAG-$S-32k-b512-recipe.json" 2>&1 | grep -v -i warn | grep "tokens/s\|breakdown\|rror"
  exit
fi
# packed: attention per document (data.reset_attention_mask), so every micro-batch is one row of packed documents
# (thd) and RoPE takes Megatron's thd hook: ours (rope=triton) against Megatron's per-document path (compile)
timeout 300 python3 scripts/bench_train.py --config configs/llama1b_moba_32k_b512.yaml logging.progress_bar=off \
  train.global_batch_size=2 "run.output_dir=/tmp/runs/b512" data.reset_attention_mask=true \
  data.reset_position_ids=true --warmup 2 --steps 5 --profile --arm packed: \
  --arm packed_megatron_rope:model.fusions.rope=compile --arm packed_full:attention.mode=full \
  --out "$OUT/train-$TAG-$S-32k-b512-packed.json" 2>&1 | grep -v -i warn | grep "tokens/s\|breakdown\|rror"
