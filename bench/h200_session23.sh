#!/usr/bin/env bash
# Session 23's calls, one H200, from the repository root of a device call; .whl carried:
#   GIT_COMMIT=<sha> bash bench/h200_session23.sh norms   # our RMSNorm kernels with the residual adds folded in
#                                                        # (model.fusions.rmsnorm=triton): their compiled tests,
#                                                        # bench_fusions at the 1.1B recipe's shapes (with other
#                                                        # tiles), then the 32K recipe's step, full attention and
#                                                        # MoBA b512 top-3, each with PyTorch's norms and with ours,
#                                                        # in one process (~5 min)
case "${1:-}" in
norms) ;;
*) echo "usage: bash bench/h200_session23.sh norms" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rmsnorm.py tests/test_fusions.py \
  -k "rmsnorm or fused_norm or checkpoints or each_fusion" > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
timeout 120 python3 scripts/bench_fusions.py --config $RECIPE --out "$OUT/fusions-h200-${GIT_COMMIT:0:7}.json" 2>&1 \
  | grep -v -i warn | tail -20
timeout 300 python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 6 \
  --profile --arm full:attention.mode=full --arm full_tnorm:attention.mode=full,model.fusions.rmsnorm=triton \
  --arm "moba512:attention.block_size=512,attention.topk=3" \
  --arm "moba512_tnorm:attention.block_size=512,attention.topk=3,model.fusions.rmsnorm=triton" \
  --out "$OUT/train-h200-${GIT_COMMIT:0:7}-32k-norms.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -16
