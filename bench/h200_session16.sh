#!/usr/bin/env bash
# Session 16's kernel call, one H200, from the repository root of a device call; .whl carried:
#   GIT_COMMIT=<sha> bash bench/h200_session16.sh kernel   # the compiled kernel tests (session 15's did not import),
#                                                         # correctness at the quality study's shape (12 / 4 heads,
#                                                         # 8K, block 512, top-3; random and skewed routing), and
#                                                         # the packed dK/dV (backward.DKDV_PACKED) against the
#                                                         # kernel in use at the recipe and standard shapes (~4 min)
#   GIT_COMMIT=<sha> bash bench/h200_session16.sh train    # after the packed dK/dV became the default where a block
#                                                         # has several key tiles: its compiled tests, then the 1.1B
#                                                         # recipe at 32K, full attention and MoBA b512 top-3 (~2 min)
#   GIT_COMMIT=<sha> bash bench/h200_session16.sh probe    # run in session 17 (bench/NOTES.md): of the dQ partials' 2.1 ms in
#                                                         # r32k-b512's dK/dV, what the products alone take (probe
#                                                         # 4) against none (probe 2), over the packed kernel, and
#                                                         # two 64-row query steps (~4 min)
# The quality study's calls are bench/h200_session13.sh's (pair, hybrid, arm5).
case "${1:-}" in
kernel|train|probe) ;;
*) echo "usage: bash bench/h200_session16.sh kernel|train|probe" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
if [ "$1" = train ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py \
    -k "packs_the_picks or packed_dkdv" > "$OUT/gpu-tests.log" 2>&1
  tail -3 "$OUT/gpu-tests.log"
  timeout 300 python3 scripts/bench_train.py --config $RECIPE $COMMON train.recompute=none --warmup 2 --steps 6 \
    --profile --arm full:attention.mode=full --arm "moba512:attention.block_size=512,attention.topk=3" \
    --out "$OUT/train-h200-${GIT_COMMIT:0:7}-32k.json" 2>&1 | grep -v -i warn | tail -30
  exit
fi
if [ "$1" = probe ]; then
  timeout 300 python3 scripts/bench_kernels.py --variants --out "$OUT/probe" --commit "$GIT_COMMIT" \
    --variant-shapes r32k-b512 \
    --variant-names d64_base,d64_gathered,d64_probe_no_dq,d64_probe_dq_product,d64_k128_m64,d64_k256_m64_s2 2>&1 \
    | grep -v -i warn | grep -v "rel_err" | tail -30
  exit
fi
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py \
  -k "dkdv or split or packed or output_and_gradients or suffix" > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
timeout 360 python3 scripts/bench_kernels.py --variants --out "$OUT/packed" --commit "$GIT_COMMIT" \
  --variant-shapes r32k-b512,r32k-b2048,r32k-b512-skew,s32k-b128,s32k-b512 \
  --variant-names d64_base,d64_packed,std_base,std_packed 2>&1 | grep -v -i warn | grep -v "rel_err" | tail -45
