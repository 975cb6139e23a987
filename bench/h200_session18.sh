#!/usr/bin/env bash
# Session 18's prepared call, one H200, from the repository root of a device call; .whl and
# data/site_corpus.tar.xz carried:
#   SEED=1357 GIT_COMMIT=<sha> bash bench/h200_session18.sh long   # prepared, not yet run: does a 2-full-layer
#                                                        # hybrid that learned no retrieval in 34M tokens (seeds 1357
#                                                        # and 7890, docs/quality.md sessions 16-17) learn it with
#                                                        # twice the budget? The shared start and the hybrid only,
#                                                        # 68M tokens (2,080 steps; about 7 min); its recall is read
#                                                        # against the same seed's full arm at 34M (98.8% at 1357,
#                                                        # 97.9% at 7890), which twice the tokens cannot lower.
# More paired runs of the 3-layer hybrid: `SEED=<new> GIT_COMMIT=<sha> bash bench/h200_session17.sh pair3`.
case "${1:-}" in
long) ;;
*) echo "usage: bash bench/h200_session18.sh long" >&2; exit 2 ;;
esac
source bench/gpu_env.sh
TOKENS=$((2 * 34078720))
source bench/study_call.sh
SEED=${SEED:?set SEED=1357 or 7890, a seed whose 2-layer hybrid learned no retrieval}
WORK_DIR=runs/study-seed$SEED-long
study hybrid 9.3 --track-passkey 16 "run.seed=$SEED"
