#!/usr/bin/env bash
# The GPU runs of session 10 (bench/NOTES.md), one H200, from the repository root of a device call:
#   bash bench/h200_session10.sh kernels  # GPU kernel tests; recipe shapes against the previous kernels; D-64 variants
#   bash bench/h200_session10.sh variants # after the first: what each change does at D 64 (and 256-key dK/dV tiles)
#   bash bench/h200_session10.sh final    # GPU kernel tests; the kept changes against session 8's split rule; recipes
#   bash bench/h200_session10.sh last     # after compacting the split partials: GPU tests, the shapes they touch
#   bash bench/h200_session10.sh speed    # 32K training (full, MoBA 512 / top-3); standard shapes against the previous kernels
# Wheels (.whl: megatron-core, pydantic, datasets, liger-kernel) are carried; .baseline/kernels holds the kernels
# of the commit before this session's (git archive 7863827 kernels | tar -x -C .baseline), ignored by git: carry
# it too (session 10 ran with it untracked, before /.baseline/ was ignored).
source bench/gpu_env.sh
case "${1:-}" in
kernels)
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py \
    > "$OUT/gpu-tests.log" 2>&1; tail -4 "$OUT/gpu-tests.log"
  timeout 150 python3 scripts/bench_attention.py --set recipes --backends moba-triton,moba-triton-baseline \
    --baseline .baseline --out "$OUT/attention-recipes.json" 2>&1 | grep -v -i warn | tail -16
  timeout 170 python3 scripts/bench_kernels.py --variants --out "$OUT" \
    --variant-names d64_base,d64_split_uniform,d64_dkdv_w4_s5,d64_dkdv_k256_w8 2>&1 | grep -v -i warn | tail -26
  ;;
variants)
  timeout 400 python3 scripts/bench_kernels.py --variants --out "$OUT" --variant-shapes r32k-b2048,r32k-b512,r32k-b512-skew \
    --variant-names d64_base,d64_splits1,d64_causal_masked,d64_row_mask,d64_dkdv_k256_w8,d64_k256_splits1,d64_k256_w8_s2 \
    2>&1 | grep -v -i warn | tail -30
  ;;
final)
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py \
    > "$OUT/gpu-tests.log" 2>&1; tail -3 "$OUT/gpu-tests.log"
  timeout 200 python3 scripts/bench_kernels.py --variants --out "$OUT" --variant-shapes r32k-b2048,r32k-b512,r32k-b512-skew \
    --variant-names d64_base,d64_splits1,d64_split_uniform 2>&1 | grep -v -i warn | tail -12
  timeout 150 python3 scripts/bench_attention.py --set recipes --backends moba-triton,moba-triton-baseline \
    --baseline .baseline --out "$OUT/attention-recipes.json" 2>&1 | grep -v -i warn | tail -16
  ;;
last)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py \
    -k "dkdv or extra_splits or output_and_gradients or suffix or inference" > "$OUT/gpu-tests.log" 2>&1
  tail -3 "$OUT/gpu-tests.log"
  timeout 70 python3 scripts/bench_attention.py --backends moba-triton,moba-triton-baseline --baseline .baseline \
    --shapes s32k-b128,s32k-b512 --out "$OUT/attention-standard.json" 2>&1 | grep -v -i warn | tail -9
  timeout 70 python3 scripts/bench_attention.py --set recipes --backends moba-triton,moba-triton-baseline \
    --baseline .baseline --shapes r32k-b2048,r32k-b512 --out "$OUT/attention-recipes.json" 2>&1 | grep -v -i warn | tail -9
  ;;
speed)
  timeout 130 python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 4 --profile \
    --arm full:attention.mode=full --arm "moba512:attention.block_size=512,attention.topk=3" \
    --out "$OUT/train-32k.json" 2>&1 | grep -v -i warn | grep -v breakdown | tail -4
  timeout 200 python3 scripts/bench_attention.py --backends moba-triton,moba-triton-baseline --baseline .baseline \
    --out "$OUT/attention-standard.json" 2>&1 | grep -v -i warn | tail -14
  ;;
*) echo "usage: bash bench/h200_session10.sh kernels|variants|final|speed|last" >&2; exit 2 ;;
esac
