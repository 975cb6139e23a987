#!/usr/bin/env bash
# The GPU runs of session 6 (bench/NOTES.md), one H200, from the repository root of a device call:
#   bash bench/h200_session6.sh fusions   # GPU tests, the fused kernels, the 32K training arms, #12's probe
#   bash bench/h200_session6.sh long      # the 128K training arms, cuDNN attention, the direct kernel entry
#   bash bench/h200_session6.sh sparse    # 128K: sparser MoBA settings against full attention
# Wheels (.whl: megatron-core, pydantic, datasets, liger-kernel) and .baseline (the 1456a3d kernels) are carried.
source bench/gpu_env.sh
PLAIN="model.fusions.rmsnorm=torch,model.fusions.swiglu=torch,model.fusions.rope=torch,model.fusions.cross_entropy=megatron"
case "${1:-}" in
fusions)
  python3 -m pytest -q -p no:cacheprovider tests/test_fusions.py -k cuda 2>&1 | tail -3 | tee "$OUT/gpu-tests.log"
  python3 scripts/bench_fusions.py --config $RECIPE --out "$OUT/fusions.json" 2>&1 | grep -v -i warn
  python3 scripts/bench_attention.py --shapes s32k-b512,s32k-b128 --passes fwd --backends moba-triton,moba-triton-baseline \
    --baseline .baseline --kernel-times --out "$OUT/attention-b512-fwd-kernels.json" 2>&1 | grep -v -i warn | tail -8
  python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 4 --profile \
    --arm "full_plain:attention.mode=full,$PLAIN" --arm full:attention.mode=full \
    --arm "moba512:attention.block_size=512,attention.topk=3" \
    --arm "moba512_all:attention.block_size=512,attention.topk=3,attention.full_layers=0" \
    --arm moba2048: --out "$OUT/train-32k.json" 2>&1 | grep -v -i warn | tail -30
  ;;
long)
  python3 -m pytest -q -p no:cacheprovider tests/attention/test_sdpa_backend.py tests/test_fusions.py -k cuda 2>&1 | tail -3 | tee "$OUT/gpu-tests-long.log"
  python3 scripts/bench_attention.py --set recipes --shapes r32k-b2048 --passes fwdbwd --backends sdpa,sdpa-cudnn \
    --out "$OUT/attention-full-r32k.json" 2>&1 | grep -v -i warn | tail -3
  python3 scripts/bench_attention.py --shapes s32k-b512 --passes fwd --backends moba-triton,moba-triton-direct,moba-triton-baseline \
    --baseline .baseline --kernel-times --out "$OUT/attention-b512-fwd-direct.json" 2>&1 | grep -v -i warn | tail -4
  L="train.seq_length=131072 model.max_position_embeddings=131072 train.global_batch_size=1"
  python3 scripts/bench_train.py --config $RECIPE data.kind=synthetic logging.progress_bar=off $L --warmup 1 --steps 2 --profile \
    --arm "moba4096:attention.block_size=4096,attention.topk=4,train.recompute=selective" \
    --arm full:attention.mode=full,train.recompute=selective \
    --arm "moba4096_all:attention.block_size=4096,attention.topk=4,attention.full_layers=0,train.recompute=selective" \
    --arm "moba4096_fullrc:attention.block_size=4096,attention.topk=4,train.recompute=full" \
    --arm "moba2048:attention.block_size=2048,attention.topk=4,train.recompute=selective" \
    --arm "full_cudnn:attention.mode=full,attention.full_backend=cudnn,train.recompute=selective" \
    --out "$OUT/train-128k.json" 2>&1 | grep -v -i warn | tail -24
  python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 4 --profile \
    --arm full:attention.mode=full --arm full_cudnn:attention.mode=full,attention.full_backend=cudnn \
    --out "$OUT/train-32k-full.json" 2>&1 | grep -v -i warn | tail -8
  ;;
sparse)
  L="train.seq_length=131072 model.max_position_embeddings=131072 train.global_batch_size=1 train.recompute=selective"
  python3 scripts/bench_train.py --config $RECIPE data.kind=synthetic logging.progress_bar=off $L --warmup 1 --steps 2 --profile \
    --arm "moba1024:attention.block_size=1024,attention.topk=4" \
    --arm "moba2048t3:attention.block_size=2048,attention.topk=3" \
    --arm "moba1024_all:attention.block_size=1024,attention.topk=4,attention.full_layers=0" \
    --arm "moba2048_all:attention.block_size=2048,attention.topk=4,attention.full_layers=0" \
    --arm full:attention.mode=full \
    --out "$OUT/train-128k-sparse.json" 2>&1 | grep -v -i warn | tail -20
  ;;
*) echo "usage: bash bench/h200_session6.sh fusions|long|sparse" >&2; exit 2 ;;
esac
