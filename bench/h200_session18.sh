#!/usr/bin/env bash
# Session 18's prepared calls, one H200, from the repository root of a device call; .whl and
# data/site_corpus.tar.xz carried:
#   SEED=1357 GIT_COMMIT=<sha> bash bench/h200_session18.sh long   # prepared, not yet run: does a 2-full-layer
#                                                        # hybrid that learned no retrieval in 34M tokens (seeds 1357
#                                                        # and 7890, docs/quality.md sessions 16-17) learn it with
#                                                        # twice the budget? The shared start and the hybrid only,
#                                                        # 68M tokens (2,080 steps; about 7 min); its recall is read
#                                                        # against the same seed's full arm at 34M (98.8% at 1357,
#                                                        # 97.9% at 7890), which twice the tokens cannot lower.
#   SEED=<n> GIT_COMMIT=<sha> bash bench/h200_session18.sh moba256   # prepared, not yet run: what would close
#                                                        # MoBA's loss gap (+3.9%, block 512, top-3)? The same keys
#                                                        # per query in smaller blocks: block 256, top-6, paired
#                                                        # with full attention in one process (the shared start,
#                                                        # arm 1 and arm 2; about 7 min)
#   GIT_COMMIT=<sha> bash bench/h200_session18.sh kernel    # superseded by bench/h200_session19.sh kernel, which
#                                                        # times these two with four more: r32k-b512 with the dQ partials
#                                                        # as dS K (a 32-row operand) against the shipped K^T dS^T,
#                                                        # over the packed dK/dV; the transposed product won 4% in
#                                                        # an early session (bench/NOTES.md, "Designs tried"), at
#                                                        # other shapes, before packing (about 3 min)
# More paired runs of the 3-layer hybrid: `SEED=<new> GIT_COMMIT=<sha> bash bench/h200_session17.sh pair3`.
case "${1:-}" in
long|moba256|kernel) ;;
*) echo "usage: bash bench/h200_session18.sh long|moba256|kernel" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
if [ "$1" = kernel ]; then
  timeout 400 python3 scripts/bench_kernels.py --variants --out "$OUT/kernel" --commit "$GIT_COMMIT" \
    --variant-shapes r32k-b512 --variant-names d64_base,d64_dq_untransposed 2>&1 \
    | grep -v -i warn | grep -v "rel_err" | grep -v "^ " | tail -12
  exit
fi
if [ "$1" = long ]; then
  TOKENS=$((2 * 34078720))
fi
source bench/study_call.sh
if [ "$1" = moba256 ]; then
  SEED=${SEED:?set SEED=<a seed not run before>}
  WORK_DIR=runs/study-seed$SEED-moba256
  study full,moba 9.2 --track-passkey 16 "run.seed=$SEED" attention.block_size=256 attention.topk=6
  exit
fi
SEED=${SEED:?set SEED=1357 or 7890, a seed whose 2-layer hybrid learned no retrieval}
WORK_DIR=runs/study-seed$SEED-long
study hybrid 9.3 --track-passkey 16 "run.seed=$SEED"
