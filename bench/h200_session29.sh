#!/usr/bin/env bash
# Session 29's calls, from the repository root of a device call; .whl and data/site_corpus.tar.xz carried:
#   SEED=<n> GIT_COMMIT=<sha> bash bench/h200_session29.sh full     # the shared start and arm 1 at twice the
#                                                                   # tokens (68M, 2,080 steps; about 8 min)
#   SEED=<n> GIT_COMMIT=<sha> bash bench/h200_session29.sh hybrid   # then, on the same warm machine, the hybrid
#                                                                   # (last 2 of 12 layers full) from the same start
#                                                                   # (about 6 min); `moba` runs arm 2 the same way
# A paired run at 68M tokens per arm: does the 2-layer hybrid's loss gap (+1.37% over 12 pooled runs at 34M,
# docs/quality.md) shrink with twice the tokens? Session 23 ran the hybrid alone at 68M (seed 1357) with no full
# arm to pair it with. Both calls share runs/study-seed<n>-long2, so the second resumes the first's start and keeps
# its arm 1; on a fresh machine the second call would have no arm 1 and would run the start again.
# Session 30 ran seeds 5024 and 6024 (docs/quality.md, "Session 30"; pooled-session30-long2): a further pair at a
# new seed pools with those two.
case "${1:-}" in
full|hybrid|moba) ;;
*) echo "usage: SEED=<n> bash bench/h200_session29.sh full|hybrid|moba" >&2; exit 2 ;;
esac
: "${SEED:?set SEED=<a seed not run before>}"
source bench/gpu_env.sh
TOKENS=$((2 * 34078720))
source bench/study_call.sh
WORK_DIR=runs/study-seed$SEED-long2
study "$1" 9.5 --track-passkey 16 "run.seed=$SEED"
