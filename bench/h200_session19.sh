#!/usr/bin/env bash
# Session 19's prepared call, one H200, from the repository root of a device call; .whl carried:
#   GIT_COMMIT=<sha> bash bench/h200_session19.sh kernel   # prepared, not yet run (no GPU was lent in session 19):
#                                                        # r32k-b512 with dK/dV forms whose main loop spills less
#                                                        # on sm_90 (scripts/compile_kernels.py, bench/NOTES.md
#                                                        # session 19): the shipped loop has 33 spill instructions;
#                                                        # none with dS K for the dQ partials (also at 2 stages and
#                                                        # with 16-row steps), with 128-key tiles (d64_splits8_w8)
#                                                        # or 64-row steps (d64_k128_m64). Their compiled tests
#                                                        # first; last, whether the CPU compile check builds the
#                                                        # kernels the GPU's JIT builds (about 5 min)
# The study calls stay in bench/h200_session18.sh (long, moba256) and bench/h200_session17.sh (pair3).
case "${1:-}" in
kernel) ;;
*) echo "usage: bash bench/h200_session19.sh kernel" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py \
  -k "dq_partials_of_the_packed or packed_dkdv" > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
timeout 360 python3 scripts/bench_kernels.py --variants --out "$OUT/kernel" --commit "$GIT_COMMIT" \
  --variant-shapes r32k-b512 \
  --variant-names d64_base,d64_dq_untransposed,d64_dq_untransposed_s2,d64_dq_untransposed_m16,d64_splits8_w8,d64_k128_m64 \
  2>&1 | grep -v -i warn | grep -v "rel_err" | grep -v "^ " | tail -14
# Does the CPU compile check build the GPU's kernels? Each kernel Triton's JIT built here for the recipe's calls
# against the launches compiled from the interpreter's recording (the same PTX, and the driver's registers/spills)
timeout 300 python3 scripts/compile_kernels.py --workloads d64_b512_gqa4,d64_b64_shared,d128_b128 --against-gpu \
  --json "$OUT/compile-against-gpu.json" 2>&1 | grep -v -i warn | tail -4
