#!/usr/bin/env bash
# Session 28's call, from the repository root of a device call; carry .whl:
#   GIT_COMMIT=<sha> bash bench/h200_session28.sh batch   # any GPU (~5 min):
#     1. the 32K pair (full attention, MoBA b512 top-3) at 2 x 32K tokens per step, the protocol and the
#        README's rows;
#     2. the same pair at the recipes' own global batch, 8 x 32K tokens per step (8 micro-batches per update, as
#        configs/llama1b_moba_32k*.yaml ship): what the per-step costs (the update, the step's start after the
#        host reads its loss) weigh when a step carries four times the tokens;
#     3. scripts/bench_memory.py at the 128K recipe (the MLP recomputed), one layer on one document and on
#        packed documents, since full attention on packed documents takes FA2's GQA and v is copied off the QKV
#        output (383c431, 777e163; moba_train/memory.py cites 99f2efd for 128K)
case "${1:-}" in
batch) ;;
*) echo "usage: bash bench/h200_session28.sh batch" >&2; exit 2 ;;
esac
: "${GIT_COMMIT:?pass GIT_COMMIT=<sha>}"
source bench/gpu_env.sh  # also GPU, TAG and S
PAIR="--arm full:attention.mode=full --arm moba512:attention.block_size=512,attention.topk=3"
timeout 150 python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 6 \
  --profile $PAIR --out "$OUT/train-$TAG-$S-32k.json" 2>&1 | grep -v -i warn | grep "tokens/s\|/ full\|rror"
timeout 240 python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none \
  train.global_batch_size=8 --warmup 2 --steps 5 --profile $PAIR --out "$OUT/train-$TAG-$S-32k-gbs8.json" 2>&1 \
  | grep -v -i warn | grep "tokens/s\|/ full\|breakdown\|rror"
timeout 150 python3 scripts/bench_memory.py --config configs/llama1b_moba_128k.yaml data.kind=synthetic \
  --out "$OUT/memory-$TAG-$S-128k.json" 2>&1 | grep -v -i warn | grep "B/token\|rror"
