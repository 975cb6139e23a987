#!/usr/bin/env bash
# Session 38's kernel call, one GPU, from the repository root of a device call; .whl and .baseline carried:
#   GIT_COMMIT=<sha> bash bench/h200_session38.sh kernels   # .baseline made here first: rm -rf .baseline &&
#                                                          # mkdir .baseline && git archive aad69b6 kernels | tar -x -C .baseline
# Commit 4fc0e43 made the block prologue and the causal key count one jit helper each (block_queries, causal_keys).
# On the CPU, 87 of the 90 recorded launches compiled for sm_90 to byte-identical SASS and the other three
# (_dkdv_kernel) to the same instructions in another register assignment; that is not a timing. This call times
# the kernels against aad69b6's (the last commit before the refactor) in one process, at the recipes' shapes and at
# the standard shapes (every backend checked against the fp32 reference before timing), then runs the GPU kernel
# tests in the time left (TEST_SECONDS, default 120). About 8 minutes.
case "${1:-}" in
kernels) ;;
*) echo "usage: GIT_COMMIT=<sha> bash bench/h200_session38.sh kernels" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
[ -d .baseline/kernels ] || { echo ".baseline/kernels is missing: make it with git archive (see the header)" >&2; exit 2; }
for set in recipes standard; do
  timeout 240 python3 scripts/bench_attention.py --set $set --backends moba-triton-direct,moba-triton-baseline \
    --baseline .baseline --out "$OUT/attention-$set-$TAG-$S-vs-aad69b6.json" 2>&1 | grep -v -i warn | tail -14
done
timeout "${TEST_SECONDS:-120}" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py \
  > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
