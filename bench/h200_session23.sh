#!/usr/bin/env bash
# Session 23's calls, one H200, from the repository root of a device call; .whl carried:
#   GIT_COMMIT=<sha> bash bench/h200_session23.sh norms   # our RMSNorm kernels with the residual adds folded in
#                                                        # (model.fusions.rmsnorm=triton): their compiled tests,
#                                                        # bench_fusions at the 1.1B recipe's shapes (with other
#                                                        # tiles), then the 32K recipe's step, full attention and
#                                                        # MoBA b512 top-3, each with PyTorch's norms and with ours,
#                                                        # in one process (~5 min)
#   GIT_COMMIT=<sha> bash bench/h200_session23.sh power   # the 32K recipe's full-attention step with PyTorch's norms
#                                                        # and with ours while nvidia-smi logs power, SM clock and
#                                                        # throttle reasons every 50 ms (~2 min): is the step
#                                                        # power-bound, which would explain why 14 ms less of
#                                                        # memory-bound kernels left it unchanged (the norms call)?
#   GIT_COMMIT=<sha> bash bench/h200_session23.sh qkv     # after the fused QKV split + RoPE (FusedQKVRoPESelfAttention)
#                                                        # and our norms became `auto`: the compiled RoPE and RMSNorm
#                                                        # tests and the sync-free training step, bench_fusions' QKV
#                                                        # and residual cases, then the 32K step: full attention with
#                                                        # the defaults and with PyTorch's norms, and MoBA b512 top-3
#                                                        # (~3.5 min)
case "${1:-}" in
norms|power|qkv) ;;
*) echo "usage: bash bench/h200_session23.sh norms|power|qkv" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
if [ "$1" = qkv ]; then
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rope.py tests/kernels/test_rmsnorm.py \
    tests/test_optimizer.py -k "rope or qkv or rms or norm or host_sync" > "$OUT/gpu-tests.log" 2>&1
  tail -2 "$OUT/gpu-tests.log"
  timeout 60 python3 scripts/bench_fusions.py --config $RECIPE --ops qkv_rope,residual_rmsnorm \
    --out "$OUT/fusions-qkv-${GIT_COMMIT:0:7}.json" 2>&1 | grep -v -i warn | grep "ms "
  timeout 200 python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 8 \
    --profile --arm full:attention.mode=full --arm full_torchnorm:attention.mode=full,model.fusions.rmsnorm=torch \
    --arm "moba512:attention.block_size=512,attention.topk=3" \
    --out "$OUT/train-${GIT_COMMIT:0:7}-32k-qkv.json" 2>&1 | grep -v -i warn | grep "tokens/s\|/ full"
  exit
fi
if [ "$1" = power ]; then
  nvidia-smi --query-gpu=name,power.limit,power.max_limit,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.csv"
  nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
    --format=csv,nounits -lms 50 > "$OUT/power-log.csv" &
  SMI=$!
  timeout 240 python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 10 \
    --arm full:attention.mode=full --arm full_tnorm:attention.mode=full,model.fusions.rmsnorm=triton \
    --arm "moba512:attention.block_size=512,attention.topk=3" \
    --out "$OUT/train-h200-${GIT_COMMIT:0:7}-32k-power.json" 2>&1 | grep -v -i warn | grep "tokens/s\|/ full"
  kill $SMI
  python3 - "$OUT/power-log.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))[1:]
busy = [r for r in rows if len(r) > 6 and float(r[5]) > 90]
watts = sorted(float(r[1]) for r in busy)
clocks = sorted(float(r[2]) for r in busy)
print(f"busy samples {len(busy)}: power median {watts[len(watts)//2]:.0f} W (p90 {watts[int(len(watts)*.9)]:.0f}), "
      f"SM clock median {clocks[len(clocks)//2]:.0f} MHz (p10 {clocks[len(clocks)//10]:.0f})")
from collections import Counter
print("throttle reasons:", Counter(r[6].strip() for r in busy).most_common(4))
PY
  exit
fi
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
