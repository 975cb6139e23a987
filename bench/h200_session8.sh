#!/usr/bin/env bash
# The GPU runs of session 8 (bench/NOTES.md), one H200, from the repository root of a device call:
#   bash bench/h200_session8.sh dense   # GPU tests of the new fusions, bench_fusions, 32K and 128K training arms
#   bash bench/h200_session8.sh again   # the same with Liger-Kernel; 128K with 1 and 8 dK/dV splits
#   bash bench/h200_session8.sh split   # dK/dV splits from the tile count; block 1024 top-3 and top-4 at 128K
#   bash bench/h200_session8.sh kernels # attention benchmark (standard shapes vs 1456a3d, recipe shapes), fusions
#   bash bench/h200_session8.sh recheck # the regressed standard shapes after the no-split rule; fusions
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
again)  # with Liger-Kernel carried (the first call lacked it: auto fell back to Megatron's SwiGLU and CE)
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rope.py tests/test_optimizer.py tests/test_fusions.py \
    -k "rope or cuda or grad_accumulation" > "$OUT/gpu-tests.log" 2>&1; tail -4 "$OUT/gpu-tests.log"
  python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 4 --profile \
    --arm full:attention.mode=full --arm "full_before:attention.mode=full,$OLD" --arm full_again:attention.mode=full \
    --arm "moba512:attention.block_size=512,attention.topk=3" \
    --out "$OUT/train-32k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -8
  python3 bench/run_with_knobs.py backward.DKDV_SPLIT_BYTES=1 -- scripts/bench_train.py --config $RECIPE \
    data.kind=synthetic logging.progress_bar=off $L --warmup 1 --steps 2 --profile \
    --arm "moba1024_nosplit:attention.block_size=1024,attention.topk=4" \
    --out "$OUT/train-128k-nosplit.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -2
  python3 bench/run_with_knobs.py backward.DKDV_SPLIT_BYTES=8589934592 -- scripts/bench_train.py --config $RECIPE \
    data.kind=synthetic logging.progress_bar=off $L --warmup 1 --steps 2 --profile \
    --arm "moba1024_split8:attention.block_size=1024,attention.topk=4" --arm full:attention.mode=full \
    --out "$OUT/train-128k-split8.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -4
  ;;
split)  # dK/dV splits from the tile count (DKDV_TARGET_PROGRAMS 16384 / 8192), top-3 at 128K, 32K again
  python3 -m pytest -q -p no:cacheprovider tests/test_optimizer.py tests/kernels/test_moba_triton.py \
    -k "grad_accumulation or split" > "$OUT/gpu-tests.log" 2>&1; tail -3 "$OUT/gpu-tests.log"
  python3 scripts/bench_train.py --config $RECIPE data.kind=synthetic logging.progress_bar=off $L --warmup 1 --steps 2 --profile \
    --arm "moba1024:attention.block_size=1024,attention.topk=4" --arm "moba1024t3:attention.block_size=1024,attention.topk=3" \
    --arm full:attention.mode=full --out "$OUT/train-128k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -6
  python3 bench/run_with_knobs.py backward.DKDV_TARGET_PROGRAMS=8192 -- scripts/bench_train.py --config $RECIPE \
    data.kind=synthetic logging.progress_bar=off $L --warmup 1 --steps 2 --profile \
    --arm "moba1024_t8192:attention.block_size=1024,attention.topk=4" \
    --arm "moba1024t3_t8192:attention.block_size=1024,attention.topk=3" \
    --out "$OUT/train-128k-target8192.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -3
  python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 4 --profile \
    --arm full:attention.mode=full --arm "moba512:attention.block_size=512,attention.topk=3" \
    --out "$OUT/train-32k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -4
  ;;
kernels)  # the standard attention shapes against the 1456a3d kernels (.baseline carried), the recipes' shapes, fusions
  python3 scripts/bench_attention.py --backends moba-triton,moba-triton-baseline --baseline .baseline \
    --out "$OUT/attention-standard.json" 2>&1 | grep -v -i warn | tail -14
  python3 scripts/bench_attention.py --set recipes --backends moba-triton \
    --out "$OUT/attention-recipes.json" 2>&1 | grep -v -i warn | tail -8
  python3 scripts/bench_fusions.py --config $RECIPE --out "$OUT/fusions.json" 2>&1 | grep -v -i warn | tail -16
  ;;
recheck)  # after the no-split rule from 8,192 tiles: the two standard shapes that regressed, and the fusions
  python3 scripts/bench_attention.py --backends moba-triton,moba-triton-baseline --baseline .baseline \
    --shapes s32k-b128,s32k-b512 --out "$OUT/attention-standard-recheck.json" 2>&1 | grep -v -i warn | tail -9
  python3 scripts/bench_fusions.py --config $RECIPE --out "$OUT/fusions.json" 2>&1 | grep -v -i warn | tail -16
  ;;
*) echo "usage: bash bench/h200_session8.sh dense|again|split|kernels|recheck" >&2; exit 2 ;;
esac
