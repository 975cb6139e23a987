#!/usr/bin/env bash
# Session 14's kernel probe (bench/NOTES.md), one H200, from the repository root of a device call; .whl carried:
#   GIT_COMMIT=<sha> bash bench/h200_session14.sh ws   # dK/dV's gathered-query loop with Triton's automatic
#                                                     # warp specialisation, against the kept kernel (r32k-b512)
# The quality study's calls of this session were bench/h200_session13.sh's arm5 and pair (SEED=3456, 4567).
case "${1:-}" in
ws) ;;
*) echo "usage: bash bench/h200_session14.sh ws" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
python3 -c "import triton; print('triton', triton.__version__)"
# Variants that fail to compile stop the process: the warp-specialised ones run first, the kept kernel again alone.
timeout 150 python3 scripts/bench_kernels.py --variants --out "$OUT/ws" --commit "$GIT_COMMIT" \
  --variant-shapes r32k-b512 --variant-names d64_dkdv_ws,d64_dkdv_ws_k128_w4,d64_base 2>&1 | grep -v -i warn | tail -25
[ -f "$OUT/ws/variants.json" ] && grep -q '"d64_base"' "$OUT/ws/variants.json" && exit 0
timeout 100 python3 scripts/bench_kernels.py --variants --out "$OUT/base" --commit "$GIT_COMMIT" \
  --variant-shapes r32k-b512 --variant-names d64_base 2>&1 | grep -v -i warn | tail -12
