#!/usr/bin/env bash
# Session 25's first call, from the repository root of a device call; .whl carried (the run at e767dc4 named its
# files h100-train-... and h100-fusions-...; renamed by hand to the names below):
#   GIT_COMMIT=<sha> bash bench/h200_session25.sh speed   # session 23's `qkv` call (the compiled RoPE and RMSNorm
#                                                        # tests, bench_fusions' QKV and residual cases, the 32K step:
#                                                        # full attention with the defaults and with PyTorch's norms,
#                                                        # MoBA b512 top-3) to time the fused QKV RoPE kernel after
#                                                        # d70e384 (the angles once per program); then, on an H200
#                                                        # only (it does not fit in 80 GB), the 128K recipe: full
#                                                        # attention, the recipe, all-MoBA (~6.5 min)
#   GIT_COMMIT=<sha> bash bench/h200_session25.sh h200    # on an H200 (needs_h200): the README's training table with
#                                                        # the new defaults, the 32K pair (full attention, MoBA b512
#                                                        # top-3) and then the 128K recipe (~3.5 min)
case "${1:-}" in
speed|h200) ;;
*) echo "usage: bash bench/h200_session25.sh speed|h200" >&2; exit 2 ;;
esac
: "${GIT_COMMIT:?pass GIT_COMMIT=<sha>}"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in *H200*) TAG=h200 ;; *) TAG=h100 ;; esac
echo "device: $GPU"
OUT=${OUT:-/tmp/out}
if [ "$1" = h200 ]; then
  [ "$TAG" = h200 ] || { echo "not an H200: this call is for the H200's tables" >&2; exit 1; }
  source bench/gpu_env.sh
  timeout 150 python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 6 \
    --profile --arm full:attention.mode=full --arm "moba512:attention.block_size=512,attention.topk=3" \
    --out "$OUT/train-h200-${GIT_COMMIT:0:7}-32k.json" 2>&1 | grep -v -i warn | grep "tokens/s\|/ full"
  bash bench/h200_session17.sh train128k
  exit
fi
# session 23's `qkv` writes its step as train-<sha>-32k-qkv.json; name the device as bench/results does
bash bench/h200_session23.sh qkv
S=${GIT_COMMIT:0:7}
[ -f "$OUT/train-$S-32k-qkv.json" ] && mv "$OUT/train-$S-32k-qkv.json" "$OUT/train-$TAG-$S-32k-qkv.json"
[ -f "$OUT/fusions-qkv-$S.json" ] && mv "$OUT/fusions-qkv-$S.json" "$OUT/fusions-$TAG-$S-qkv.json"
[ -f "$OUT/gpu-tests.log" ] && mv "$OUT/gpu-tests.log" "$OUT/gpu-tests-$TAG-$S-qkv.log"
if [ "$TAG" = h200 ]; then
  bash bench/h200_session17.sh train128k
else
  echo "not an H200: the 128K recipe does not fit in 80 GB (session 23, call 5); skipped"
fi
