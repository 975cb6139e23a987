#!/usr/bin/env bash
# Session 15's kernel probe for the next device call (bench/NOTES.md, session 15), one H200, from the repository
# root of a device call; .whl carried:
#   GIT_COMMIT=<sha> bash bench/h200_session15.sh probe   # r32k-b512: the kept kernel and the dK/dV timing probes
#                                                        # (gathers replaced by computed rows, dQ partials dropped,
#                                                        # both) and the packed dK/dV (backward.DKDV_PACKED), each
#                                                        # with its profile's per-kernel times (~3-4 min)
# The quality study's calls are bench/h200_session13.sh's (pair, hybrid, arm5).
case "${1:-}" in
probe) ;;
*) echo "usage: bash bench/h200_session15.sh probe" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
# The dK/dV kernel gained the variants' arguments after its last GPU run: its compiled tests first.
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_moba_triton.py \
  -k "dkdv or split or packed or output_and_gradients or suffix" > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
timeout 400 python3 scripts/bench_kernels.py --variants --out "$OUT/probe" --commit "$GIT_COMMIT" \
  --variant-shapes r32k-b512 --variant-names d64_base,d64_probe_rows,d64_probe_no_dq,d64_probe_both,d64_packed 2>&1 \
  | grep -v -i warn | grep -v "rel_err" | tail -40
