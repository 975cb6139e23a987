#!/usr/bin/env bash
# The GPU runs of session 7 (bench/NOTES.md), one H200, from the repository root of a device call:
#   bash bench/h200_session7.sh tune    # GPU tests (optimizer, checkpoints), head-dim-64 kernel tilings, 32K full
#   bash bench/h200_session7.sh main    # GPU tests, a second D-64 sweep, the 32K and 128K training arms
#   bash bench/h200_session7.sh last    # the sync test, split dK/dV programs, 32K and 128K arms again
#   bash bench/h200_session7.sh train   # 32K and 128K training arms, the standard attention shapes vs 1456a3d
# Wheels (.whl: megatron-core, pydantic, datasets, liger-kernel) and .baseline (the 1456a3d kernels) are carried.
source bench/gpu_env.sh
L="train.seq_length=131072 model.max_position_embeddings=131072 train.global_batch_size=1 train.recompute=selective"
case "${1:-}" in
tune)
  python3 -m pytest -q -p no:cacheprovider tests/test_optimizer.py tests/test_checkpointing.py 2>&1 | tail -15 \
    | tee "$OUT/gpu-tests.log"
  python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 4 --profile \
    --arm full:attention.mode=full --out "$OUT/train-32k-full.json" 2>&1 | grep -v -i warn | tail -6
  python3 scripts/bench_kernels.py --variants --commit "$GIT_COMMIT" --out "$OUT" \
    --variant-names "${VARIANTS:-d64_base,d64_fwd_k128,d64_fwd_k128_s2,d64_fwd_w4,d64_fwd_s4,d64_dkdv_m64,d64_dkdv_w4,d64_dkdv_m64_w4,d64_dkdv_s4,d64_dq_w8,d64_ws_kt8}" \
    2>&1 | grep -v -i warn | grep -A80 "^variant "
  ;;
main)
  python3 -m pytest -q -p no:cacheprovider tests/test_optimizer.py tests/test_checkpointing.py tests/test_fusions.py \
    -k "cuda or checkpoint or update or non_finite" > "$OUT/gpu-tests.log" 2>&1; tail -3 "$OUT/gpu-tests.log"
  python3 scripts/bench_kernels.py --variants --commit "$GIT_COMMIT" --out "$OUT" \
    --variant-names d64_base,d64_dkdv_w4_s2,d64_dkdv_w4_s4,d64_dkdv_m16_w4,d64_dkdv_k64_w4,d64_dq_w2 \
    2>&1 | grep -v -i warn | grep -A40 "^variant "
  python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 4 --profile \
    --arm full:attention.mode=full --arm full_mb2:attention.mode=full,train.micro_batch_size=2 \
    --arm "moba512:attention.block_size=512,attention.topk=3" \
    --arm "moba512_mb2:attention.block_size=512,attention.topk=3,train.micro_batch_size=2" \
    --arm "moba512_all:attention.block_size=512,attention.topk=3,attention.full_layers=0" \
    --out "$OUT/train-32k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -12
  python3 scripts/bench_train.py --config $RECIPE data.kind=synthetic logging.progress_bar=off $L --warmup 1 --steps 2 --profile \
    --arm "moba1024:attention.block_size=1024,attention.topk=4" \
    --arm "moba512t4:attention.block_size=512,attention.topk=4" \
    --arm "moba1024_all:attention.block_size=1024,attention.topk=4,attention.full_layers=0" \
    --arm full:attention.mode=full \
    --out "$OUT/train-128k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -10
  ;;
last)
  python3 -m pytest -q -p no:cacheprovider tests/test_optimizer.py tests/test_fusions.py -k "cuda or checkpoint" \
    > "$OUT/gpu-tests.log" 2>&1; tail -3 "$OUT/gpu-tests.log"
  python3 scripts/bench_kernels.py --variants --commit "$GIT_COMMIT" --out "$OUT" \
    --variant-names d64_base,d64_splits1,d64_splits4,d64_splits8_w8 2>&1 | grep -v -i warn | grep -A24 "^variant "
  python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 4 --profile \
    --arm full:attention.mode=full --arm "moba512:attention.block_size=512,attention.topk=3" \
    --arm "moba512_all:attention.block_size=512,attention.topk=3,attention.full_layers=0" --arm moba2048: \
    --out "$OUT/train-32k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -8
  python3 scripts/bench_train.py --config $RECIPE data.kind=synthetic logging.progress_bar=off $L --warmup 1 --steps 2 --profile \
    --arm "moba1024:attention.block_size=1024,attention.topk=4" --arm full:attention.mode=full \
    --out "$OUT/train-128k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -4
  ;;
train)
  python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 4 --profile \
    --arm full:attention.mode=full \
    --arm "moba512:attention.block_size=512,attention.topk=3" \
    --arm "moba512_all:attention.block_size=512,attention.topk=3,attention.full_layers=0" \
    --out "$OUT/train-32k.json" 2>&1 | grep -v -i warn | tail -12
  python3 scripts/bench_train.py --config $RECIPE data.kind=synthetic logging.progress_bar=off $L --warmup 1 --steps 2 --profile \
    --arm "moba1024:attention.block_size=1024,attention.topk=4" \
    --arm "moba512t4:attention.block_size=512,attention.topk=4" \
    --arm "moba1024_all:attention.block_size=1024,attention.topk=4,attention.full_layers=0" \
    --arm full:attention.mode=full \
    --out "$OUT/train-128k.json" 2>&1 | grep -v -i warn | tail -14
  python3 scripts/bench_attention.py --backends moba-triton,moba-triton-baseline --baseline .baseline \
    --out "$OUT/attention-standard.json" 2>&1 | grep -v -i warn | tail -14
  python3 scripts/bench_attention.py --set recipes --backends moba-triton \
    --out "$OUT/attention-recipes.json" 2>&1 | grep -v -i warn | tail -8
  ;;
*) echo "usage: bash bench/h200_session7.sh tune|main|last|train" >&2; exit 2 ;;
esac
