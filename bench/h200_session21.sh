#!/usr/bin/env bash
# Session 21's call, one GPU, from the repository root of a device call; .whl and .baseline carried. Failed machine
# starts left this session about 10 minutes of device time, so session 20's prepared `recipes` call runs with its
# stages reordered: the recipes' shapes first (bench_attention.py --set recipes: the dS K form of b2e2fd0 against
# d497370's kernels in one process, every backend checked against the fp32 reference before timing), then the GPU
# kernel tests in whatever time is left.
#   GIT_COMMIT=<sha> bash bench/h200_session21.sh recipes   # .baseline made here first: mkdir -p .baseline &&
#                                                         # git archive d497370 kernels | tar -x -C .baseline
# SHAPES=r32k-b512,r32k-b2048 times those shapes only; TEST_SECONDS caps the tests (default 180).
case "${1:-}" in
recipes) ;;
*) echo "usage: bash bench/h200_session21.sh recipes" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
[ -d .baseline/kernels ] || { echo ".baseline/kernels is missing: make it with git archive (see the header)" >&2; exit 2; }
timeout 300 python3 scripts/bench_attention.py --set recipes ${SHAPES:+--shapes "$SHAPES"} \
  --backends moba-triton,moba-triton-baseline \
  --baseline .baseline --out "$OUT/attention-recipes.json" 2>&1 | grep -v -i warn | tail -16
timeout "${TEST_SECONDS:-180}" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py \
  > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
