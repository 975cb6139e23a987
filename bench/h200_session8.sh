#!/usr/bin/env bash
# The GPU runs of session 8 (bench/NOTES.md), one H200, from the repository root of a device call:
#   bash bench/h200_session8.sh dense   # GPU tests of the new fusions, bench_fusions, 32K and 128K training arms
# Wheels (.whl: megatron-core, pydantic, datasets, liger-kernel) are carried.
source bench/gpu_env.sh
L="train.seq_length=131072 model.max_position_embeddings=131072 train.global_batch_size=1 train.recompute=selective"
OLD="model.fusions.rope=compile,model.fusions.grad_accumulation=torch"
case "${1:-}" in
dense)
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rope.py tests/test_optimizer.py tests/test_fusions.py \
    -k "rope or cuda or grad_accumulation or each_fusion" > "$OUT/gpu-tests.log" 2>&1; tail -4 "$OUT/gpu-tests.log"
  python3 scripts/bench_fusions.py --config $RECIPE --out "$OUT/fusions.json" 2>&1 | grep -v -i warn | tail -14
  python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 4 --profile \
    --arm full:attention.mode=full --arm "full_before:attention.mode=full,$OLD" \
    --arm "moba512:attention.block_size=512,attention.topk=3" \
    --out "$OUT/train-32k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -8
  python3 scripts/bench_train.py --config $RECIPE data.kind=synthetic logging.progress_bar=off $L --warmup 1 --steps 2 --profile \
    --arm "moba1024:attention.block_size=1024,attention.topk=4" --arm full:attention.mode=full \
    --out "$OUT/train-128k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -6
  ;;
*) echo "usage: bash bench/h200_session8.sh dense" >&2; exit 2 ;;
esac
