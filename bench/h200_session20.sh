#!/usr/bin/env bash
# Session 20's call, one GPU, from the repository root of a device call; .whl carried. Only 450 s of device time
# were left to this session, so session 19's prepared call (bench/h200_session19.sh) runs trimmed: the dK/dV forms
# whose sm_90 loop spills less, timed against the shipped one at r32k-b512 first (each stage's numbers are saved as
# it ends), then their compiled tests, then the compile check against the GPU's JIT for the recipe's workload.
#   GIT_COMMIT=<sha> bash bench/h200_session20.sh kernel    # ran on an H100 (bench/NOTES.md, session 20)
#   GIT_COMMIT=<sha> bash bench/h200_session20.sh recipes   # prepared, not yet run: on the H200, the GPU kernel tests,
#                                                        # then the recipes' shapes (bench_attention.py --set recipes)
#                                                        # with the dS K form against the kernels before it, for the
#                                                        # README's table (about 5 min). Carry .whl and .baseline, made
#                                                        # here first: mkdir -p .baseline && git archive d497370 kernels
#                                                        # | tar -x -C .baseline
case "${1:-}" in
kernel|recipes) ;;
*) echo "usage: bash bench/h200_session20.sh kernel|recipes" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
if [ "$1" = recipes ]; then
  [ -d .baseline/kernels ] || { echo ".baseline/kernels is missing: make it with git archive (see the header)" >&2; exit 2; }
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py > "$OUT/gpu-tests.log" 2>&1
  tail -3 "$OUT/gpu-tests.log"
  timeout 300 python3 scripts/bench_attention.py --set recipes --backends moba-triton,moba-triton-baseline \
    --baseline .baseline --out "$OUT/attention-recipes.json" 2>&1 | grep -v -i warn | tail -16
  exit
fi
timeout 210 python3 scripts/bench_kernels.py --variants --out "$OUT/kernel" --commit "$GIT_COMMIT" \
  --variant-shapes r32k-b512 \
  --variant-names d64_base,d64_dq_untransposed,d64_splits8_w8,d64_k128_m64,d64_dq_untransposed_s2,d64_dq_untransposed_m16 \
  > "$OUT/kernel.log" 2>&1
grep -v -i warn "$OUT/kernel.log" | grep -v "rel_err" | grep -v "^ " | tail -14
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py \
  -k "dq_partials_of_the_packed" > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
timeout 40 python3 scripts/compile_kernels.py --workloads d64_b512_gqa4 --against-gpu \
  --json "$OUT/compile-against-gpu.json" 2>&1 | grep -v -i warn | tail -4
